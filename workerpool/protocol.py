"""The queue protocol: the only module that knows Redis key names, the task wire format and the
Lua scripts. Every step that touches more than one key is one script, so it is atomic on a
standalone server and, since every key of a queue shares one hash tag, on a cluster too.

Delivery guarantee: a task is always in exactly one place in Redis - the queue, one worker's
processing list, the retry set or the dead list - and moves between them only atomically.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors

from workerpool.connection import push_and_wait, push_and_wait_async

try:  # optional speed-up (the `fast` extra)
    import orjson

    # The C functions themselves: no Python frame per task on the hot path.
    _loads: Callable[[bytes], Any] = orjson.loads
    _dumps: Callable[[Any], bytes] = orjson.dumps

    _JSON_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - exercised when the extra is absent

    def _loads(raw: bytes) -> Any:
        return json.loads(raw.decode("utf-8"))

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    _JSON_ERRORS = (ValueError,)

# The largest batch one script moves; Lua's unpack() has a stack limit near 8000.
MAX_BATCH = 1000


class InvalidTask(ValueError):
    """A raw entry is not a task; `reason` is the short code stored in the dead-letter entry."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_task(raw: bytes, max_payload_bytes: int) -> dict[str, Any]:
    """Parse and validate one raw entry of the queue (DESIGN.md, 'Task format')."""
    if len(raw) > max_payload_bytes:
        raise InvalidTask("too_large", f"{len(raw)} bytes > max_payload_bytes {max_payload_bytes}")
    try:
        task = _loads(raw)
    except _JSON_ERRORS + (RecursionError,) as exc:  # stdlib json: deep nesting recurses
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as utf_error:
            raise InvalidTask("invalid_utf8", str(utf_error)) from None
        raise InvalidTask("invalid_json", str(exc)) from None
    except UnicodeDecodeError as exc:
        raise InvalidTask("invalid_utf8", str(exc)) from None
    if not isinstance(task, dict):
        raise InvalidTask("not_an_object", f"JSON {type(task).__name__}, expected an object")
    task_type = task.get("type")
    if not isinstance(task_type, str):
        detail = "missing 'type'" if task_type is None else "'type' is not a string"
        raise InvalidTask("bad_type", detail)
    return task


def encode_task(task: dict[str, Any]) -> bytes:
    """Serialize a task for the queue."""
    return _dumps(task)


def new_task(task_type: str, data: Any = None, **extra: Any) -> dict[str, Any]:
    """A task as workerpool's producer writes it: type, data, id, attempts, enqueued_at."""
    task: dict[str, Any] = {"type": task_type, "data": {} if data is None else data}
    task.update(extra)
    task.setdefault("id", uuid.uuid4().hex)
    task.setdefault("attempts", 0)
    task.setdefault("enqueued_at", time.time())
    return task


def retry_delay(attempts: int, backoff: float) -> float:
    """Exponential backoff with full jitter in [0.5, 1.0] of the step: backoff * 2**(n-1)."""
    if backoff <= 0:
        return 0.0
    step = backoff * (2 ** min(attempts - 1, 20))
    return step * (0.5 + random.random() / 2)


def dead_entry(
    raw: bytes, reason: str, error: str, attempts: int, host: str, worker: str
) -> bytes:
    """A dead-letter entry; the exact bytes of a non-UTF-8 task are kept in task_base64."""
    entry: dict[str, Any] = {
        "task": raw.decode("utf-8", "replace"),
        "reason": reason,
        "error": error,
        "failed_at": time.time(),
        "attempts": attempts,
        "host": host,
        "worker": worker,
    }
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        entry["task_base64"] = base64.b64encode(raw).decode("ascii")
    return _dumps(entry)


def dead_entry_task(entry: dict[str, Any]) -> bytes:
    """The original raw task of a decoded dead-letter entry."""
    if "task_base64" in entry:
        return base64.b64decode(entry["task_base64"])
    if "task_hex" in entry:  # written by the REQUEUE script, which has no base64
        return bytes.fromhex(entry["task_hex"])
    return str(entry["task"]).encode("utf-8")


@dataclass(frozen=True)
class QueueKeys:
    """Every Redis key of one queue (DESIGN.md, 'Redis keys')."""

    queue: str

    @property
    def tag(self) -> str:
        start = self.queue.find("{")
        if start != -1:
            end = self.queue.find("}", start + 1)
            if end > start + 1:
                return self.queue[start + 1 : end]
        return self.queue

    @property
    def prefix(self) -> str:
        return "{" + self.tag + "}"

    @property
    def retry(self) -> str:
        return self.prefix + ":retry"

    @property
    def dead(self) -> str:
        return self.prefix + ":dead"

    @property
    def hosts(self) -> str:
        return self.prefix + ":hosts"

    @property
    def deliveries(self) -> str:
        """Hash: raw task -> how many deliveries ended with its worker dying (poison pills)."""
        return self.prefix + ":deliveries"

    def settled(self, processing: str) -> str:
        """String: the token of the last settlement applied to a processing list (a resend of
        it must not be applied again). One key per list, kept SETTLED_TTL after its last use."""
        return self.prefix + ":settled:" + processing[len(self.prefix + ":processing:"):]

    def host_status(self, host: str) -> str:
        """String: the JSON status a supervisor publishes for `status --all-hosts`."""
        return f"{self.prefix}:status:{host}"

    def processing(self, host: str, worker: str | int) -> str:
        return f"{self.prefix}:processing:{host}:{worker}"

    def processing_pattern(self, host: str | None = None) -> str:
        """A SCAN pattern for the processing lists of one host, or of all hosts."""
        escaped_prefix = _glob_escape(self.prefix + ":processing:")
        return escaped_prefix + (_glob_escape(host) + ":*" if host else "*")

    def processing_owner(self, key: bytes | str) -> tuple[str, str]:
        """(host, worker) of a processing key."""
        text = key.decode() if isinstance(key, bytes) else key
        rest = text[len(self.prefix + ":processing:") :]
        host, _, worker = rest.rpartition(":")
        return host, worker


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


# --- Lua scripts. KEYS and ARGV are documented above each one.

# KEYS: queue, processing, deliveries. ARGV: n, idle (1 if the taker runs nothing now).
# Moves up to n of the oldest tasks to the processing list (oldest first, so the list is
# newest-at-head as with BLMOVE, and REQUEUE gives them back in their original order).
# Returns {flag, tasks newest first}. A suspect - a task whose worker died while running it -
# is only taken alone, by an idle worker, so that if it kills again only it is blamed:
# flag 1 = the one task returned is a suspect; flag 2 = the oldest task is a suspect and the
# taker is busy (nothing taken: wait until idle, do not block on the queue).
TAKE = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
local count = #items
if count == 0 then return {0} end
local flag = 0
if redis.call('HLEN', KEYS[3]) > 0 then
  local clean = 0
  for i = count, 1, -1 do
    if redis.call('HEXISTS', KEYS[3], items[i]) == 1 then break end
    clean = clean + 1
  end
  if clean == 0 then
    if ARGV[2] ~= '1' then return {2} end
    clean, flag = 1, 1
  end
  if clean < count then
    local oldest = {}
    for i = count - clean + 1, count do oldest[#oldest + 1] = items[i] end
    items, count = oldest, clean
  end
end
if count == redis.call('LLEN', KEYS[1]) then
  redis.call('DEL', KEYS[1])
else
  redis.call('LTRIM', KEYS[1], 0, -count - 1)
end
local oldest_first = {}
for i = count, 1, -1 do oldest_first[count - i + 1] = items[i] end
redis.call('LPUSH', KEYS[2], unpack(oldest_first))
local reply = {flag}
for i = 1, count do reply[i + 1] = items[i] end
return reply
"""

# How long the settled marker of a processing list outlives its last settlement: far longer
# than any outage a worker keeps resending through (one small key per worker process).
SETTLED_TTL = 86400
# The error code of SETTLE's own refusal (a malformed call): sending it again cannot help.
SETTLE_REFUSED = "REFUSED"

# KEYS: processing, retry, dead, deliveries, settled marker.
# ARGV: token, marker ttl, number of acks, the acked raws, then (kind, raw, member, score)
# records where kind is 'r' (member goes to the retry set at score) or 'd' (member is the
# dead-letter entry).
SETTLE = """
local acks = tonumber(ARGV[3])
local first = acks + 4
for i = first, #ARGV, 4 do
  -- Refuse the whole call before any write: a script error does not roll back.
  if ARGV[i] == 'r' and not tonumber(ARGV[i + 3]) then
    return redis.error_reply('""" + SETTLE_REFUSED + """ bad retry score ' .. ARGV[i + 3])
  end
end
-- Sent again after a lost reply: already applied, do nothing. (A second LREM would remove
-- a still-running copy of an identical task.) A worker writes one settlement at a time and
-- resends only the last one, so the last applied token of its list is all there is to know.
if redis.call('GET', KEYS[5]) == ARGV[1] then return -1 end
-- The first write: under maxmemory it fails (OOM) before anything else is written.
redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[2])
local track = redis.call('HLEN', KEYS[4]) > 0
for i = 4, acks + 3 do
  redis.call('LREM', KEYS[1], -1, ARGV[i])
  if track then redis.call('HDEL', KEYS[4], ARGV[i]) end
end
for i = first, #ARGV, 4 do
  local raw, member = ARGV[i + 1], ARGV[i + 2]
  -- The destination first: an error reply there (NOPERM from an ACL lacking a command)
  -- stops the script with the task still in its processing list, to run again, not lost.
  if ARGV[i] == 'r' then
    redis.call('ZADD', KEYS[2], ARGV[i + 3], member)
  else
    redis.call('LPUSH', KEYS[3], member)
  end
  if redis.call('LREM', KEYS[1], -1, raw) == 0 then
    -- No longer held (requeued meanwhile): not ours to settle.
    if ARGV[i] == 'r' then
      redis.call('ZREM', KEYS[2], member)
    else
      redis.call('LREM', KEYS[3], 1, member)
    end
  end
  if track then redis.call('HDEL', KEYS[4], raw) end
end
return acks
"""

# Lua: is a string valid UTF-8 (else cjson would write bytes that are not JSON)?
_LUA_VALID_UTF8 = """
local function valid_utf8(text)
  local i, n = 1, #text
  while i <= n do
    local c = string.byte(text, i)
    local len, low, high = 1, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then low = 0xA0 elseif c == 0xED then high = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then low = 0x90 elseif c == 0xF4 then high = 0x8F end
    else return false end
    for j = i + 1, i + len - 1 do
      local d = string.byte(text, j)
      if not d or d < low or d > high then return false end
      low, high = 0x80, 0xBF
    end
    i = i + len
  end
  return true
end
-- A dead-letter entry holding raw exactly: bytes JSON cannot hold are hex-encoded.
local function dead_entry(raw, fields)
  fields.task = raw
  if not valid_utf8(raw) then
    fields.task = '(not UTF-8)'
    fields.task_hex = (raw:gsub('.', function(ch)
      return string.format('%02x', string.byte(ch))
    end))
  end
  return cjson.encode(fields)
end
"""

# KEYS: retry, queue, dead. ARGV: now, limit. Retry members are '<token>:<raw>' (unique in
# the set). Each member is removed as it is handled, and one without the separator (not
# written by workerpool) is dead-lettered: a member that stayed would be pushed every tick.
# Returns how many tasks went back to the queue.
MOVE_DUE = _LUA_VALID_UTF8 + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local sep = string.find(member, ':', 1, true)
  if sep then
    redis.call('LPUSH', KEYS[2], string.sub(member, sep + 1))
    moved = moved + 1
  else
    redis.call('LPUSH', KEYS[3], dead_entry(member, {reason = 'bad_retry_entry',
      error = 'retry set member without the token separator', failed_at = tonumber(ARGV[1]),
      attempts = 0, host = '', worker = ''}))
  end
end
return moved
"""

# KEYS: processing, queue, dead, deliveries.
# ARGV: max_deliveries, count (1 = this delivery ended in a death), now, host, worker.
# Empties a processing list back to the head of the queue; a task whose deliveries reach
# max_deliveries goes to the dead list instead. Returns {requeued, dead}.
REQUEUE = _LUA_VALID_UTF8 + """
local limit = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local requeued, dead = 0, 0
while true do
  local raw = redis.call('LPOP', KEYS[1])
  if not raw then break end
  local deliveries = 0
  if count == 1 then
    deliveries = redis.call('HINCRBY', KEYS[4], raw, 1)
  end
  if count == 1 and deliveries >= limit then
    redis.call('HDEL', KEYS[4], raw)
    redis.call('LPUSH', KEYS[3], dead_entry(raw, {reason = 'max_deliveries',
      error = 'its worker died ' .. deliveries .. ' times while running it',
      failed_at = tonumber(ARGV[3]), attempts = deliveries, host = ARGV[4], worker = ARGV[5]}))
    dead = dead + 1
  else
    redis.call('RPUSH', KEYS[2], raw)
    requeued = requeued + 1
  end
end
return {requeued, dead}
"""

# KEYS: processing, queue. ARGV: the raws the worker knows it holds.
# After a lost reply (connection dropped mid-take) the list may hold tasks the worker never
# saw; give those back to the head of the queue. Returns how many were given back.
RELEASE_UNKNOWN = """
local known = {}
for i = 1, #ARGV do known[ARGV[i]] = (known[ARGV[i]] or 0) + 1 end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local released = 0
for i = 1, #items do
  local raw = items[i]
  if (known[raw] or 0) > 0 then
    known[raw] = known[raw] - 1
  else
    redis.call('LREM', KEYS[1], 1, raw)
    redis.call('RPUSH', KEYS[2], raw)
    released = released + 1
  end
end
return released
"""

# KEYS: processing, queue. ARGV: raw. Gives one task taken but not started back to the
# consuming end of the queue (it is the next to be taken, as it was). Returns 1 if it was held.
GIVE_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# KEYS: dead, queue. ARGV: entry, raw task. Moves one dead entry's task back to the queue.
REVIVE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# Host heartbeats are stamped and judged with the Redis server's clock, so supervisors on
# hosts whose clocks disagree never take a live host for a silent one.
# KEYS: hosts, host status. ARGV: host, status ttl in ms, [status].
HEARTBEAT = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], now[1] .. '.' .. string.format('%06d', now[2]), ARGV[1])
if ARGV[3] then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
end
"""

# KEYS: hosts. ARGV: seconds. Returns {server time, host, beat, host, beat, ...} of the hosts
# last heard more than (ARGV[1] > 0) or at most (ARGV[1] < 0) |ARGV[1]| seconds ago.
HOSTS_BY_AGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local age = tonumber(ARGV[1])
local found
if age >= 0 then
  found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - age), 'WITHSCORES')
else
  found = redis.call('ZRANGEBYSCORE', KEYS[1], now + age, '+inf', 'WITHSCORES')
end
table.insert(found, 1, t[1] .. '.' .. string.format('%06d', t[2]))
return found
"""

SCRIPTS = {
    "take": TAKE,
    "settle": SETTLE,
    "move_due": MOVE_DUE,
    "requeue": REQUEUE,
    "release_unknown": RELEASE_UNKNOWN,
    "give_back": GIVE_BACK,
    "revive": REVIVE,
    "heartbeat": HEARTBEAT,
    "hosts_by_age": HOSTS_BY_AGE,
}


def retry_member(raw: bytes) -> bytes:
    """A retry-set member: a unique token, ':', then the raw task (identical tasks stay apart)."""
    return os.urandom(8).hex().encode() + b":" + raw


def retry_member_task(member: bytes) -> bytes:
    return member.partition(b":")[2]


class Settlement:
    """Finished deliveries of one processing list waiting to be written in one round trip."""

    __slots__ = ("acks", "records", "token")

    def __init__(self) -> None:
        self.acks: list[bytes] = []
        self.records: list[Any] = []
        # Names this write: sent again after a lost reply, it is not applied twice.
        self.token = os.urandom(8).hex()

    @property
    def token_number(self) -> int:
        """The token as an unsigned 64-bit number (for the scoreboard)."""
        return int(self.token, 16)

    def __len__(self) -> int:
        return len(self.acks) + len(self.records) // 4

    def ack(self, raw: bytes) -> None:
        self.acks.append(raw)

    def retry(self, raw: bytes, new_raw: bytes, due: float) -> None:
        self.records += (b"r", raw, retry_member(new_raw), repr(float(due)).encode())

    def dead(self, raw: bytes, entry: bytes) -> None:
        self.records += (b"d", raw, entry, b"0")

    def args(self) -> list[Any]:
        return [self.token, SETTLED_TTL, len(self.acks), *self.acks, *self.records]


class _Base:
    """What the sync and asyncio queues share: keys, scripts and argument building."""

    def __init__(self, client: Any, redis_key: str) -> None:
        self.client = client
        self.keys = QueueKeys(redis_key)
        self._scripts = {name: client.register_script(text) for name, text in SCRIPTS.items()}

    def _take_call(
        self, processing: str, count: int, idle: bool = True
    ) -> tuple[Any, list[str], list[Any]]:
        count = max(1, min(count, MAX_BATCH))
        keys = [self.keys.queue, processing, self.keys.deliveries]
        return self._scripts["take"], keys, [count, 1 if idle else 0]

    def _settle_call(
        self, processing: str, settlement: Settlement
    ) -> tuple[Any, list[str], list[Any]]:
        keys = [processing, self.keys.retry, self.keys.dead, self.keys.deliveries,
                self.keys.settled(processing)]
        return self._scripts["settle"], keys, settlement.args()

    def _move_due_call(self, now: float | None, limit: int) -> tuple[Any, list[str], list[Any]]:
        when = time.time() if now is None else now
        keys = [self.keys.retry, self.keys.queue, self.keys.dead]
        return self._scripts["move_due"], keys, [repr(when), limit]

    def _requeue_call(
        self, processing: str, max_deliveries: int, count_delivery: bool
    ) -> tuple[Any, list[str], list[Any]]:
        host, worker = self.keys.processing_owner(processing)
        keys = [processing, self.keys.queue, self.keys.dead, self.keys.deliveries]
        args = [max_deliveries, 1 if count_delivery else 0, repr(time.time()), host, worker]
        return self._scripts["requeue"], keys, args

    def _release_call(
        self, processing: str, known: Sequence[bytes]
    ) -> tuple[Any, list[str], list[Any]]:
        return self._scripts["release_unknown"], [processing, self.keys.queue], list(known)


class SyncQueue(_Base):
    """The queue protocol over a synchronous redis-py client (supervisor, CLI, producers)."""

    def _call(self, call: tuple[Any, list[str], list[Any]]) -> Any:
        script, keys, args = call
        return script(keys=keys, args=args)

    def enqueue(self, task: dict[str, Any] | bytes, wait_replicas: int = 0,
                wait_timeout: float = 10.0) -> None:
        """Push one task (a dict, or raw bytes already encoded)."""
        self.enqueue_many([task], wait_replicas=wait_replicas, wait_timeout=wait_timeout)

    def enqueue_many(
        self,
        tasks: Iterable[dict[str, Any] | bytes],
        wait_replicas: int = 0,
        chunk: int = 1000,
        wait_timeout: float = 10.0,
    ) -> int:
        """Push many tasks in pipelined chunks; returns how many were pushed."""
        if wait_replicas:  # WAIT must follow the pushes on their own connection
            pushed, acknowledged = push_and_wait(
                self.client, self.keys.queue, list(_chunks((_raw(t) for t in tasks), chunk)),
                wait_replicas, wait_timeout)
            _check_replicas(acknowledged, wait_replicas)
            return pushed
        pushed = 0
        for batch in _chunks((_raw(task) for task in tasks), chunk):
            self.client.lpush(self.keys.queue, *batch)
            pushed += len(batch)
        return pushed

    def take(self, processing: str, count: int) -> list[bytes]:
        """Move up to `count` oldest tasks to a processing list; oldest first."""
        return _take_reply(self._call(self._take_call(processing, count)))[0]

    def settle(self, processing: str, settlement: Settlement) -> None:
        """Write acks, retries and dead letters of one processing list in one round trip."""
        if len(settlement):
            self._call(self._settle_call(processing, settlement))

    def move_due_retries(self, now: float | None = None, limit: int = MAX_BATCH) -> int:
        """Move retries whose time has come back to the queue; returns how many."""
        return int(self._call(self._move_due_call(now, limit)))

    def last_settlement(self, processing: str) -> int | None:
        """The token number of the last settlement applied to a processing list, if any."""
        token = self.client.get(self.keys.settled(processing))
        return int(token, 16) if token else None

    def requeue(
        self, processing: str, max_deliveries: int, count_delivery: bool = True
    ) -> tuple[int, int]:
        """Empty a processing list back into the queue; returns (requeued, dead-lettered)."""
        requeued, dead = self._call(self._requeue_call(processing, max_deliveries, count_delivery))
        return int(requeued), int(dead)

    def release_unknown(self, processing: str, known: Sequence[bytes]) -> int:
        return int(self._call(self._release_call(processing, known)))

    def processing_lists(self, host: str | None = None) -> list[bytes]:
        """The processing keys of one host (or all hosts) that exist now."""
        pattern = self.keys.processing_pattern(host)
        where: dict[str, Any] = {}
        if hasattr(self.client, "get_node_from_key"):
            # A cluster: every key of the queue is on the node of its slot; scan only that one
            # (redis-py would scan every primary, and fail when any of them is down).
            where["target_nodes"] = self.client.get_node_from_key(self.keys.queue)
        return sorted(set(self.client.scan_iter(match=pattern, count=1000, **where)))

    def requeue_host(self, host: str, max_deliveries: int, count_delivery: bool = True) -> int:
        """Requeue every processing list of a host; returns how many tasks moved."""
        moved = 0
        for key in self.processing_lists(host):
            requeued, dead = self.requeue(key.decode(), max_deliveries, count_delivery)
            moved += requeued + dead
        return moved

    def heartbeat(self, host: str, status: bytes | None = None, ttl: float = 60.0) -> None:
        """Record that this host's supervisor is alive (and publish its status)."""
        args: list[Any] = [host, int(ttl * 1000)] + ([status] if status is not None else [])
        self._scripts["heartbeat"](keys=[self.keys.hosts, self.keys.host_status(host)],
                                   args=args)

    def forget_host(self, host: str) -> None:
        self.client.zrem(self.keys.hosts, host)
        self.client.delete(self.keys.host_status(host))

    def _hosts_by_age(self, seconds: float) -> list[tuple[str, float]]:
        reply = self._scripts["hosts_by_age"](keys=[self.keys.hosts], args=[repr(seconds)])
        now = float(reply[0])
        return [(reply[i].decode(), now - float(reply[i + 1])) for i in range(1, len(reply), 2)]

    def silent_hosts(self, timeout: float) -> list[str]:
        """Hosts not heard for over `timeout` seconds, by the Redis server's clock."""
        return [host for host, _ in self._hosts_by_age(timeout)]

    def live_hosts(self, timeout: float) -> list[tuple[str, float, bytes | None]]:
        """(host, seconds since its heartbeat, published status) of hosts heard within `timeout`."""
        return [(host, age, self.client.get(self.keys.host_status(host)))
                for host, age in self._hosts_by_age(-timeout)]

    def counts(self, host: str | None = None) -> dict[str, int]:
        """Queue depths: pending, processing (of a host, or all), retry, dead."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.keys.queue)
        pipe.zcard(self.keys.retry)
        pipe.llen(self.keys.dead)
        pending, retry, dead = pipe.execute()
        processing = sum(self.client.llen(key) for key in self.processing_lists(host))
        return {"pending": pending, "processing": processing, "retry": retry, "dead": dead}

    def dead_entries(self, start: int = 0, stop: int = -1) -> list[tuple[int, bytes]]:
        """(index, raw entry) of dead letters, newest first."""
        raws = self.client.lrange(self.keys.dead, start, stop)
        return list(enumerate(raws, start))

    def revive(self, raw_entry: bytes) -> bool:
        """Move one dead entry's task back to the queue (attempts reset); False if gone."""
        entry = _loads(raw_entry)
        task_raw = dead_entry_task(entry)
        try:
            task = _loads(task_raw)
            if isinstance(task, dict) and "attempts" in task:
                task["attempts"] = 0
                task_raw = _dumps(task)
        except _JSON_ERRORS:
            pass
        return bool(self._scripts["revive"](keys=[self.keys.dead, self.keys.queue],
                                            args=[raw_entry, task_raw]))

    def purge_dead(self) -> int:
        """Delete every dead letter; returns how many there were."""
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.keys.dead)
        pipe.delete(self.keys.dead)
        count, _ = pipe.execute()
        return int(count)

    def clear(self) -> int:
        """Delete every pending task (not processing, retry or dead); returns how many."""
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.keys.queue)
        pipe.delete(self.keys.queue)
        count, _ = pipe.execute()
        return int(count)


class AsyncQueue(_Base):
    """The queue protocol over a redis-py asyncio client (the worker's hot path)."""

    def __init__(self, client: Any, redis_key: str, blocking_client: Any = None) -> None:
        super().__init__(client, redis_key)
        self.blocking_client = blocking_client or client

    async def _call(self, call: tuple[Any, list[str], list[Any]]) -> Any:
        script, keys, args = call
        return await script(keys=keys, args=args)

    async def enqueue_many(
        self,
        tasks: Iterable[dict[str, Any] | bytes],
        wait_replicas: int = 0,
        chunk: int = 1000,
        wait_timeout: float = 10.0,
    ) -> int:
        """Push many tasks in chunks; returns how many were pushed."""
        if wait_replicas:  # WAIT must follow the pushes on their own connection
            pushed, acknowledged = await push_and_wait_async(
                self.client, self.keys.queue, list(_chunks((_raw(t) for t in tasks), chunk)),
                wait_replicas, wait_timeout)
            _check_replicas(acknowledged, wait_replicas)
            return pushed
        pushed = 0
        for batch in _chunks((_raw(task) for task in tasks), chunk):
            await self.client.lpush(self.keys.queue, *batch)
            pushed += len(batch)
        return pushed

    async def take(self, processing: str, count: int) -> list[bytes]:
        """Move up to `count` oldest tasks to a processing list without blocking; oldest first."""
        return (await self.take_batch(processing, count))[0]

    async def take_batch(
        self, processing: str, count: int, idle: bool = True
    ) -> tuple[list[bytes], int]:
        """take(), with the suspect flag: (tasks oldest first, TAKEN / SUSPECT / WAIT_IDLE)."""
        return _take_reply(await self._call(self._take_call(processing, count, idle)))

    async def is_suspect(self, raw: bytes) -> bool:
        """True if a worker already died while running this task (run it alone)."""
        return bool(await self.client.hexists(self.keys.deliveries, raw))

    async def take_blocking(self, processing: str, timeout: float) -> bytes | None:
        """Wait up to `timeout` seconds for one task (BLMOVE) and move it to `processing`."""
        return await self.blocking_client.blmove(
            self.keys.queue, processing, timeout, "RIGHT", "LEFT"
        )

    async def settle(self, processing: str, settlement: Settlement) -> None:
        if len(settlement):
            await self._call(self._settle_call(processing, settlement))

    async def give_back(self, processing: str, raw: bytes) -> bool:
        """Return one task taken but not started to the consuming end of the queue."""
        call = (self._scripts["give_back"], [processing, self.keys.queue], [raw])
        return bool(await self._call(call))

    async def move_due_retries(self, now: float | None = None, limit: int = MAX_BATCH) -> int:
        return int(await self._call(self._move_due_call(now, limit)))

    async def requeue(
        self, processing: str, max_deliveries: int, count_delivery: bool = True
    ) -> tuple[int, int]:
        call = self._requeue_call(processing, max_deliveries, count_delivery)
        requeued, dead = await self._call(call)
        return int(requeued), int(dead)

    async def release_unknown(self, processing: str, known: Sequence[bytes]) -> int:
        return int(await self._call(self._release_call(processing, known)))


TAKEN, SUSPECT, WAIT_IDLE = 0, 1, 2  # the flag of a take (see the TAKE script)


# Error replies of a server that is busy, short of memory, failing over or syncing: the same
# call succeeds later. Matched in the message too: older servers wrap a script's error in
# "ERR Error running script ...: -OOM ...".
_TEMPORARY_ERROR = re.compile(
    r"\b(OOM|READONLY|LOADING|BUSY|TRYAGAIN|CLUSTERDOWN|MASTERDOWN|NOREPLICAS)\b")


def is_temporary_error(error: Exception) -> bool:
    """True for an error reply that passes (OOM, READONLY, CLUSTERDOWN, TRYAGAIN, MASTERDOWN,
    BUSY, LOADING, NOREPLICAS); False for a refusal that sending again cannot mend (SETTLE's
    own REFUSED, NOPERM, WRONGTYPE, a script error)."""
    if isinstance(error, (redis_errors.OutOfMemoryError, redis_errors.ReadOnlyError,
                          redis_errors.TryAgainError, redis_errors.ClusterDownError)):
        return True
    code = getattr(error, "status_code", None) or ""
    return bool(_TEMPORARY_ERROR.search(f"{code} {error}"))


def _take_reply(reply: list[Any]) -> tuple[list[bytes], int]:
    items = reply[1:]
    items.reverse()
    return items, int(reply[0])


def _check_replicas(acknowledged: Any, wanted: int) -> None:
    # The tasks are queued either way; the caller learns they may not survive a failover.
    if int(acknowledged) < wanted:
        raise TimeoutError(f"only {acknowledged} of {wanted} replicas acknowledged the write "
                           "(the tasks are queued on the master)")


def _raw(task: dict[str, Any] | bytes | str) -> bytes:
    if isinstance(task, bytes):
        return task
    if isinstance(task, str):
        return task.encode("utf-8")
    return encode_task(task)


def _chunks(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
