"""The queue protocol (workerpool/protocol.py): the Lua scripts against the real private
redis-server of tests/conftest.py, and the pure helpers (decoding, backoff, dead entries).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import redis
import redis.asyncio
from conftest import refuse_writes
from redis.crc import key_slot

from workerpool import protocol
from workerpool.protocol import (
    MAX_BATCH,
    AsyncQueue,
    InvalidTask,
    QueueKeys,
    Settlement,
    SyncQueue,
    dead_entry,
    dead_entry_task,
    decode_task,
    encode_task,
    new_task,
    retry_delay,
    retry_member,
    retry_member_task,
)

Q = "async_tasks"
HOST = "host-a"


@pytest.fixture
def queue(redis_client) -> SyncQueue:
    return SyncQueue(redis_client, Q)


@pytest.fixture
def processing(queue: SyncQueue) -> str:
    return queue.keys.processing(HOST, "w1")


def raws(*ids: str) -> list[bytes]:
    """Distinct, valid encoded tasks with the given ids."""
    return [encode_task(new_task("t", {"n": i}, id=i, enqueued_at=1.0)) for i in ids]


def ids_of(items: list[bytes]) -> list[str]:
    return [json.loads(item)["id"] for item in items]


def pending_oldest_first(client: redis.Redis) -> list[bytes]:
    """The queue in the order workers take it (producers LPUSH, workers take the right end)."""
    return list(reversed(client.lrange(Q, 0, -1)))


# --- take


def test_take_moves_oldest_first_and_at_most_n(queue, processing, redis_client):
    queue.enqueue_many(raws("a", "b", "c", "d", "e"))

    first = queue.take(processing, 2)
    assert ids_of(first) == ["a", "b"]
    assert ids_of(pending_oldest_first(redis_client)) == ["c", "d", "e"]
    # The processing list holds exactly what was returned, newest at the head (as BLMOVE
    # RIGHT LEFT leaves it), so a requeue can give them back in order.
    assert redis_client.lrange(processing, 0, -1) == list(reversed(first))

    second = queue.take(processing, 1)
    assert ids_of(second) == ["c"]
    assert ids_of(redis_client.lrange(processing, 0, -1)) == ["c", "b", "a"]

    # Asking for more than there is takes what there is and deletes the empty queue.
    rest = queue.take(processing, 10)
    assert ids_of(rest) == ["d", "e"]
    assert redis_client.exists(Q) == 0
    assert redis_client.llen(processing) == 5
    assert queue.take(processing, 3) == []
    assert queue.counts() == {"pending": 0, "processing": 5, "retry": 0, "dead": 0}


def test_take_keeps_duplicates_and_caps_batch(queue, processing, redis_client):
    same = raws("x")[0]
    queue.enqueue_many([same, same, same])
    assert queue.take(processing, 2) == [same, same]
    assert redis_client.llen(Q) == 1
    assert redis_client.llen(processing) == 2

    # A request above MAX_BATCH moves at most MAX_BATCH (Lua unpack limit), oldest first.
    redis_client.delete(Q, processing)
    queue.enqueue_many(raws(*(str(i) for i in range(MAX_BATCH + 5))))
    taken = queue.take(processing, MAX_BATCH * 3)
    assert len(taken) == MAX_BATCH
    assert ids_of(taken) == [str(i) for i in range(MAX_BATCH)]
    assert redis_client.llen(Q) == 5
    # count 0 or negative is taken as 1, never as "everything".
    assert len(queue.take(processing, 0)) == 1


def test_take_is_atomic_under_concurrent_takers(redis_server, redis_url):
    """Four clients take concurrently: every task ends in exactly one processing list."""
    setup = redis_server.client()
    SyncQueue(setup, Q).enqueue_many(raws(*(str(i) for i in range(2000))))
    setup.close()
    results: dict[int, list[bytes]] = {}

    def taker(index: int) -> None:
        client = redis_server.client()
        queue = SyncQueue(client, Q)
        key = queue.keys.processing(HOST, index)
        got: list[bytes] = []
        while True:
            items = queue.take(key, 7)
            if not items:
                break
            got += items
        results[index] = got
        client.close()

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads)
    everything = [item for got in results.values() for item in got]
    assert sorted(ids_of(everything), key=int) == [str(i) for i in range(2000)]
    # Each taker saw its own share in FIFO order.
    for got in results.values():
        numbers = [int(i) for i in ids_of(got)]
        assert numbers == sorted(numbers)
    check = redis_server.client()
    try:
        assert SyncQueue(check, Q).counts() == {
            "pending": 0, "processing": 2000, "retry": 0, "dead": 0
        }
    finally:
        check.close()


def test_take_blocking_returns_a_task_pushed_while_blocked(redis_server, redis_url):
    task = raws("late")[0]

    async def scenario() -> tuple[bytes | None, float, bytes | None, float]:
        client = redis.asyncio.Redis(port=redis_server.port)
        blocking = redis.asyncio.Redis(port=redis_server.port, socket_timeout=10)
        queue = AsyncQueue(client, Q, blocking_client=blocking)
        key = queue.keys.processing(HOST, "w1")
        try:
            pushed_at: list[float] = []

            async def push_later() -> None:
                await asyncio.sleep(0.3)
                pushed_at.append(time.monotonic())
                await client.lpush(Q, task)

            pusher = asyncio.create_task(push_later())
            got = await queue.take_blocking(key, 5)
            returned_at = time.monotonic()
            await pusher
            in_processing = await client.lindex(key, 0)
            # An empty queue: take_blocking gives None after its timeout.
            started = time.monotonic()
            nothing = await queue.take_blocking(key, 0.2)
            waited = time.monotonic() - started
            assert nothing is None
            return got, returned_at - pushed_at[0], in_processing, waited
        finally:
            await client.aclose()
            await blocking.aclose()

    got, latency, in_processing, waited = asyncio.run(asyncio.wait_for(scenario(), 15))
    assert got == task
    assert latency < 0.25, f"blocked take returned {latency:.3f}s after the push"
    assert in_processing == task
    assert 0.15 <= waited < 2.0


def test_async_queue_take_settle_requeue(redis_server, redis_url):
    """The asyncio twin of the sync protocol moves tasks the same way."""

    async def scenario() -> tuple[list[str], dict[str, int], list[str]]:
        client = redis.asyncio.Redis(port=redis_server.port)
        queue = AsyncQueue(client, Q)
        key = queue.keys.processing(HOST, "w1")
        try:
            await queue.enqueue_many(raws("a", "b", "c"))
            taken = await queue.take(key, 2)
            settlement = Settlement()
            settlement.ack(taken[0])
            await queue.settle(key, settlement)
            requeued = await queue.requeue(key, 3, count_delivery=False)
            released = await queue.release_unknown(key, [])
            assert requeued == (1, 0)
            assert released == 0
            await client.zadd(queue.keys.retry, {retry_member(raws("r")[0]): 1})
            assert await queue.move_due_retries(now=2) == 1
            sync_view = redis.Redis(port=redis_server.port)
            counts = SyncQueue(sync_view, Q).counts()
            order = ids_of(pending_oldest_first(sync_view))
            sync_view.close()
            return ids_of(taken), counts, order
        finally:
            await client.aclose()

    taken, counts, order = asyncio.run(asyncio.wait_for(scenario(), 15))
    assert taken == ["a", "b"]
    assert counts == {"pending": 3, "processing": 0, "retry": 0, "dead": 0}
    assert order == ["b", "c", "r"]


# --- settle


def test_settle_acks_retries_and_dead_letters_in_one_call(queue, processing, redis_client):
    """One Settlement with an ack, a retry and a dead letter is written by one script call."""
    queue.enqueue_many(raws("ok", "again", "bad", "untouched"))
    ok, again, bad = queue.take(processing, 3)
    retried = encode_task({**json.loads(again), "attempts": 1})
    entry = dead_entry(bad, "max_retries", "RuntimeError: boom", 4, HOST, "w1")
    due = time.time() + 60

    settlement = Settlement()
    settlement.ack(ok)
    settlement.retry(again, retried, due)
    settlement.dead(bad, entry)
    assert len(settlement) == 3

    calls: list[tuple] = []
    evalsha = redis_client.evalsha

    def counting_evalsha(*args):
        calls.append(args)
        return evalsha(*args)

    redis_client.evalsha = counting_evalsha
    queue.settle(processing, settlement)
    assert len(calls) == 1, "one settle is one script call"

    assert redis_client.llen(processing) == 0
    members = redis_client.zrange(queue.keys.retry, 0, -1, withscores=True)
    assert len(members) == 1
    member, score = members[0]
    assert retry_member_task(member) == retried
    assert score == pytest.approx(due, abs=1e-3)
    assert redis_client.lrange(queue.keys.dead, 0, -1) == [entry]
    assert ids_of(redis_client.lrange(Q, 0, -1)) == ["untouched"]

    # An empty settlement sends nothing at all.
    queue.settle(processing, Settlement())
    assert len(calls) == 1


def test_settle_for_a_raw_no_longer_held_does_nothing(queue, processing, redis_client):
    """A settle replayed after a lost reply (or for a requeued task) never duplicates it."""
    queue.enqueue_many(raws("a", "b"))
    a, b = queue.take(processing, 2)
    first = Settlement()
    first.retry(a, a, time.time() + 60)
    first.dead(b, dead_entry(b, "max_retries", "x", 1, HOST, "w1"))
    queue.settle(processing, first)
    assert queue.counts() == {"pending": 0, "processing": 0, "retry": 1, "dead": 1}

    replay = Settlement()
    replay.retry(a, a, time.time() + 60)
    replay.dead(b, dead_entry(b, "max_retries", "x", 1, HOST, "w1"))
    replay.ack(a)
    queue.settle(processing, replay)
    assert queue.counts() == {"pending": 0, "processing": 0, "retry": 1, "dead": 1}


def test_settle_removes_one_copy_of_identical_tasks(queue, processing, redis_client):
    same = raws("twin")[0]
    queue.enqueue_many([same, same])
    queue.take(processing, 2)
    settlement = Settlement()
    settlement.ack(same)
    queue.settle(processing, settlement)
    assert redis_client.lrange(processing, 0, -1) == [same]


def test_settle_forgets_delivery_counts(queue, processing, redis_client):
    queue.enqueue_many(raws("a", "b"))
    a, b = queue.take(processing, 2)
    queue.requeue(processing, max_deliveries=5)
    assert redis_client.hlen(queue.keys.deliveries) == 2
    # Suspects come one per take.
    assert queue.take(processing, 2) == [a]
    assert queue.take(processing, 2) == [b]
    settlement = Settlement()
    settlement.ack(a)
    settlement.retry(b, b, time.time() + 60)
    queue.settle(processing, settlement)
    assert redis_client.hlen(queue.keys.deliveries) == 0


# --- retries


def test_move_due_retries_moves_only_due_and_strips_token(queue, redis_client):
    twin = raws("twin")[0]
    later = raws("later")[0]
    now = time.time()
    redis_client.zadd(queue.keys.retry, {
        retry_member(twin): now - 5,
        retry_member(twin): now - 1,  # an identical task: a distinct member thanks to the token
        retry_member(later): now + 60,
    })
    assert redis_client.zcard(queue.keys.retry) == 3

    assert queue.move_due_retries(now=now) == 2
    assert redis_client.lrange(Q, 0, -1) == [twin, twin]
    remaining = redis_client.zrange(queue.keys.retry, 0, -1)
    assert [retry_member_task(m) for m in remaining] == [later]
    assert queue.move_due_retries(now=now) == 0
    assert queue.move_due_retries(now=now + 61) == 1
    assert redis_client.zcard(queue.keys.retry) == 0
    assert redis_client.lrange(Q, 0, -1) == [later, twin, twin]


def test_move_due_retries_respects_limit_and_task_colons(queue, redis_client):
    # A raw task full of ':' survives the token split intact.
    tricky = b'{"type":"a:b","data":{"url":"http://x:1/"}}'
    for i in range(5):
        redis_client.zadd(queue.keys.retry, {retry_member(tricky): i})
    assert queue.move_due_retries(now=100, limit=2) == 2
    assert redis_client.zcard(queue.keys.retry) == 3
    assert queue.move_due_retries(now=100) == 3
    assert redis_client.lrange(Q, 0, -1) == [tricky] * 5


def test_move_due_retries_dead_letters_a_member_without_separator(queue, redis_client):
    """A member not written by workerpool (no '<token>:') must not break the script after
    some pushes (not rolled back) with itself left in the set: every tick would push the
    same tasks again. Each member leaves the set as it is handled; a bad one is kept in the
    dead list."""
    good = raws("good")[0]
    redis_client.zadd(queue.keys.retry, {
        retry_member(good): 1, b"no-separator": 2, b"\xffbinary": 3, retry_member(good): 4})
    assert queue.move_due_retries(now=100) == 2
    assert redis_client.lrange(Q, 0, -1) == [good, good]
    assert redis_client.zcard(queue.keys.retry) == 0
    entries = [json.loads(raw) for raw in reversed(redis_client.lrange(queue.keys.dead, 0, -1))]
    assert [entry["reason"] for entry in entries] == ["bad_retry_entry"] * 2
    assert [dead_entry_task(entry) for entry in entries] == [b"no-separator", b"\xffbinary"]
    assert entries[0]["failed_at"] == 100
    assert queue.move_due_retries(now=200) == 0
    assert redis_client.llen(Q) == 2


def test_give_back_returns_a_task_to_the_consuming_end(queue, processing, redis_client,
                                                       redis_url):
    from workerpool.config import load_config
    from workerpool.connection import async_client

    queue.enqueue_many(raws("a", "b", "c"))
    [first] = queue.take(processing, 1)

    async def give_back_twice() -> tuple[bool, bool]:
        client = async_client(load_config(None, search=False, environ={},
                                          overrides={"redis_url": redis_url}))
        try:
            async_queue = AsyncQueue(client, Q)
            return (await async_queue.give_back(processing, first),
                    await async_queue.give_back(processing, first))
        finally:
            await client.aclose()

    assert asyncio.run(give_back_twice()) == (True, False)  # the second: no longer held
    assert redis_client.llen(processing) == 0
    assert ids_of(pending_oldest_first(redis_client)) == ["a", "b", "c"]  # next to be taken


def test_retry_member_is_unique_and_reversible():
    raw = b'{"type":"t"}'
    first, second = retry_member(raw), retry_member(raw)
    assert first != second
    assert retry_member_task(first) == raw == retry_member_task(second)


# --- requeue


def test_requeue_returns_tasks_to_the_head_in_order(queue, processing, redis_client):
    queue.enqueue_many(raws("a", "b", "c", "d"))
    assert ids_of(queue.take(processing, 2)) == ["a", "b"]
    queue.enqueue_many(raws("e"))

    assert queue.requeue(processing, max_deliveries=3, count_delivery=False) == (2, 0)
    assert redis_client.exists(processing) == 0
    # They are next to be taken, in their original order, ahead of c, d and e.
    assert ids_of(pending_oldest_first(redis_client)) == ["a", "b", "c", "d", "e"]
    other = queue.keys.processing(HOST, "w2")
    assert ids_of(queue.take(other, 5)) == ["a", "b", "c", "d", "e"]


def test_suspects_are_taken_alone_and_only_by_an_idle_worker(redis_url, processing):
    """After a worker died, each task it held is a suspect: taken alone, so a poison pill
    that kills again is the only task blamed."""
    from workerpool.config import load_config
    from workerpool.connection import async_client
    from workerpool.protocol import SUSPECT, TAKEN, WAIT_IDLE, AsyncQueue

    async def scenario() -> list:
        client = async_client(load_config(None, search=False, environ={},
                                          overrides={"redis_url": redis_url}))
        queue = AsyncQueue(client, Q)
        try:
            await queue.enqueue_many(raws("a", "b", "c"))
            first = await queue.take_batch(processing, 2)
            await queue.requeue(processing, max_deliveries=3)  # the worker died with a and b
            busy = await queue.take_batch(processing, 5, idle=False)
            alone = await queue.take_batch(processing, 5, idle=True)
            suspect_flag = await queue.is_suspect(alone[0][0])
            settlement = Settlement()
            settlement.ack(alone[0][0])
            await queue.settle(processing, settlement)
            second = await queue.take_batch(processing, 5)
            settlement = Settlement()
            settlement.ack(second[0][0])
            await queue.settle(processing, settlement)
            rest = await queue.take_batch(processing, 5)
            return [first, busy, alone, suspect_flag, second, rest,
                    await queue.is_suspect(rest[0][0])]
        finally:
            await client.aclose()

    first, busy, alone, suspect_flag, second, rest, clean = asyncio.run(scenario())
    assert (ids_of(first[0]), first[1]) == (["a", "b"], TAKEN)
    assert busy == ([], WAIT_IDLE)  # a busy worker does not take a suspect
    assert (ids_of(alone[0]), alone[1]) == (["a"], SUSPECT)
    assert suspect_flag is True
    assert (ids_of(second[0]), second[1]) == (["b"], SUSPECT)
    assert (ids_of(rest[0]), rest[1]) == (["c"], TAKEN)  # no longer a suspect behind it
    assert clean is False


def test_requeue_counts_deliveries_and_dead_letters_at_max(queue, processing, redis_client):
    poison = raws("poison")[0]
    queue.enqueue_many([poison])
    for round_ in (1, 2):
        assert queue.take(processing, 1) == [poison]
        assert queue.requeue(processing, max_deliveries=3) == (1, 0)
        assert int(redis_client.hget(queue.keys.deliveries, poison)) == round_
    assert queue.take(processing, 1) == [poison]
    assert queue.requeue(processing, max_deliveries=3) == (0, 1)

    assert queue.counts() == {"pending": 0, "processing": 0, "retry": 0, "dead": 1}
    assert redis_client.hlen(queue.keys.deliveries) == 0
    entry = json.loads(redis_client.lindex(queue.keys.dead, 0))
    assert entry["reason"] == "max_deliveries"
    assert entry["attempts"] == 3
    assert "3 times" in entry["error"]
    assert (entry["host"], entry["worker"]) == (HOST, "w1")
    assert entry["failed_at"] == pytest.approx(time.time(), abs=120)
    assert dead_entry_task(entry) == poison


def test_requeue_without_counting_never_dead_letters(queue, processing, redis_client):
    queue.enqueue_many(raws("a"))
    for _ in range(5):
        assert len(queue.take(processing, 1)) == 1
        assert queue.requeue(processing, max_deliveries=1, count_delivery=False) == (1, 0)
    assert redis_client.exists(queue.keys.deliveries) == 0
    assert queue.counts() == {"pending": 1, "processing": 0, "retry": 0, "dead": 0}


def test_requeue_host_and_processing_lists(queue, redis_client):
    queue.enqueue_many(raws(*"abcdef"))
    mine = [queue.keys.processing(HOST, n) for n in (1, 2)]
    theirs = queue.keys.processing("host-b", 1)
    queue.take(mine[0], 2)
    queue.take(mine[1], 1)
    queue.take(theirs, 1)
    assert [k.decode() for k in queue.processing_lists(HOST)] == sorted(mine)
    assert len(queue.processing_lists()) == 3
    assert queue.counts(HOST)["processing"] == 3
    assert queue.requeue_host(HOST, max_deliveries=3) == 3
    assert queue.counts() == {"pending": 5, "processing": 1, "retry": 0, "dead": 0}


@pytest.mark.parametrize("raw", [
    b'\xff\xfe{"type":"x"}',  # not UTF-8 at all
    b'{"type":"\xed\xa0\x80"}',  # an encoded surrogate: not UTF-8 either
    '{"type":"caf\u00e9 \u2603 \U0001f600"}'.encode(),  # valid multi-byte UTF-8 stays text
])
def test_requeue_of_a_non_utf8_poison_pill(queue, processing, redis_client, raw):
    """The max_deliveries entry written by Lua must keep a task that is not UTF-8."""
    queue.enqueue_many([raw])
    assert queue.take(processing, 1) == [raw]
    assert queue.requeue(processing, max_deliveries=1) == (0, 1)
    entry_raw = redis_client.lindex(queue.keys.dead, 0)
    entry = json.loads(entry_raw)  # a dead entry is JSON, i.e. UTF-8
    assert entry["reason"] == "max_deliveries"
    assert dead_entry_task(entry) == raw
    try:
        raw.decode("utf-8")
        assert entry["task"] == raw.decode("utf-8")
    except UnicodeDecodeError:
        assert entry["task"] == "(not UTF-8)"
    assert queue.revive(entry_raw) is True
    assert redis_client.lrange(Q, 0, -1) == [raw]


# --- release_unknown


def test_release_unknown_gives_back_only_unknown(queue, processing, redis_client):
    queue.enqueue_many(raws("a", "b", "c", "d"))
    a, b, c = queue.take(processing, 3)
    assert queue.release_unknown(processing, [b]) == 2
    assert redis_client.lrange(processing, 0, -1) == [b]
    # a and c are next to be taken, in their original order, ahead of d.
    assert ids_of(pending_oldest_first(redis_client)) == ["a", "c", "d"]
    assert queue.release_unknown(processing, [b]) == 0
    assert queue.release_unknown(processing, [a, b, c]) == 0
    assert redis_client.lrange(processing, 0, -1) == [b]


def test_release_unknown_counts_identical_tasks(queue, processing, redis_client):
    same = raws("twin")[0]
    queue.enqueue_many([same, same, same])
    queue.take(processing, 3)
    assert queue.release_unknown(processing, [same]) == 2
    assert redis_client.lrange(processing, 0, -1) == [same]
    assert redis_client.lrange(Q, 0, -1) == [same, same]
    assert queue.release_unknown(processing, []) == 1
    assert redis_client.exists(processing) == 0


# --- dead letters, clear, counts


def test_revive_purge_clear_and_counts(queue, processing, redis_client):
    assert queue.counts() == {"pending": 0, "processing": 0, "retry": 0, "dead": 0}
    tired = encode_task(new_task("t", id="tired", attempts=4))
    binary = b"\x80not utf-8"
    queue.enqueue_many([tired, binary, *raws("p1", "p2", "p3")])
    taken = queue.take(processing, 2)
    assert taken == [tired, binary]
    settlement = Settlement()
    settlement.dead(tired, dead_entry(tired, "max_retries", "boom", 5, HOST, "w1"))
    settlement.dead(binary, dead_entry(binary, "invalid_utf8", "bad byte", 0, HOST, "w1"))
    queue.settle(processing, settlement)
    redis_client.zadd(queue.keys.retry, {retry_member(raws("r")[0]): time.time() + 60})
    assert queue.counts() == {"pending": 3, "processing": 0, "retry": 1, "dead": 2}

    entries = queue.dead_entries()
    assert [index for index, _ in entries] == [0, 1]
    by_reason = {json.loads(e)["reason"]: e for _, e in entries}
    assert queue.revive(by_reason["max_retries"]) is True
    assert queue.revive(by_reason["max_retries"]) is False  # gone: nothing duplicated
    assert queue.revive(by_reason["invalid_utf8"]) is True
    assert queue.counts()["dead"] == 0
    pending = pending_oldest_first(redis_client)
    assert pending[-1] == binary  # exact bytes restored
    revived = json.loads(pending[-2])
    assert revived["id"] == "tired" and revived["attempts"] == 0

    for i in range(3):
        raw = raws(f"d{i}")[0]
        redis_client.lpush(queue.keys.dead, dead_entry(raw, "rejected", "", 1, HOST, "w1"))
    assert queue.dead_entries(1, 1)[0][0] == 1
    assert queue.purge_dead() == 3
    assert queue.purge_dead() == 0
    assert queue.clear() == 5
    assert queue.clear() == 0
    assert queue.counts() == {"pending": 0, "processing": 0, "retry": 1, "dead": 0}


def test_hosts_heartbeat_and_status(queue, redis_client):
    queue.heartbeat("h1", b'{"ok":1}', ttl=30)
    queue.heartbeat("h2")
    redis_client.zadd(queue.keys.hosts, {"h2": time.time() - 100})
    assert queue.silent_hosts(50) == ["h2"]
    live = queue.live_hosts(50)
    assert [(name, status) for name, _, status in live] == [("h1", b'{"ok":1}')]
    assert 0 <= live[0][1] < 5  # seconds since the heartbeat
    assert 0 < redis_client.pttl(queue.keys.host_status("h1")) <= 30_000
    queue.forget_host("h1")
    assert queue.live_hosts(1000) == [("h2", pytest.approx(100, abs=5), None)]


def test_host_heartbeats_use_the_redis_clock_not_the_hosts(queue, redis_client, monkeypatch):
    # One supervisor's clock an hour ahead, another's an hour behind: neither may take the
    # other for a silent host (that would requeue tasks that are running).
    seconds, micros = redis_client.time()
    server_now = seconds + micros / 1e6
    monkeypatch.setattr(time, "time", lambda: server_now + 3600)
    queue.heartbeat("ahead")
    monkeypatch.setattr(time, "time", lambda: server_now - 3600)
    queue.heartbeat("behind")
    beats = dict(redis_client.zrange(queue.keys.hosts, 0, -1, withscores=True))
    assert beats[b"ahead"] == pytest.approx(server_now, abs=5)
    assert beats[b"behind"] == pytest.approx(server_now, abs=5)
    assert queue.silent_hosts(30) == []
    monkeypatch.setattr(time, "time", lambda: server_now + 3600)
    assert queue.silent_hosts(30) == []
    assert sorted(host for host, _, _ in queue.live_hosts(30)) == ["ahead", "behind"]


# --- keys and hash tags


def test_keys_use_the_hash_tag_of_the_queue(redis_client):
    plain = QueueKeys("async_tasks")
    assert plain.tag == "async_tasks"
    assert plain.retry == "{async_tasks}:retry"
    assert plain.dead == "{async_tasks}:dead"
    assert plain.hosts == "{async_tasks}:hosts"
    assert plain.processing("h", 3) == "{async_tasks}:processing:h:3"

    tagged = QueueKeys("jobs{eu}")
    assert tagged.tag == "eu"
    assert tagged.retry == "{eu}:retry"
    assert tagged.dead == "{eu}:dead"
    assert tagged.deliveries == "{eu}:deliveries"
    assert tagged.host_status("h") == "{eu}:status:h"
    assert tagged.processing("web-1", "w") == "{eu}:processing:web-1:w"
    assert QueueKeys("a{}b").tag == "a{}b"  # an empty tag is no tag (as in Redis Cluster)
    assert QueueKeys("{x}{y}").tag == "x"

    # Every key of a queue hashes to the queue's cluster slot.
    for keys in (plain, tagged, QueueKeys("pre{t}post")):
        slot = key_slot(keys.queue.encode())
        for key in (keys.retry, keys.dead, keys.hosts, keys.deliveries,
                    keys.processing("h", 1), keys.host_status("h")):
            assert key_slot(key.encode()) == slot, key

    # And the scripts really write there.
    queue = SyncQueue(redis_client, "jobs{eu}")
    key = queue.keys.processing("h", 1)
    queue.enqueue_many(raws("a", "b"))
    a, b = queue.take(key, 2)
    settlement = Settlement()
    settlement.retry(a, a, 1.0)
    settlement.dead(b, dead_entry(b, "rejected", "", 1, "h", "1"))
    queue.settle(key, settlement)
    assert redis_client.zcard("{eu}:retry") == 1
    assert redis_client.llen("{eu}:dead") == 1
    assert queue.counts() == {"pending": 0, "processing": 0, "retry": 1, "dead": 1}


def test_processing_pattern_and_owner():
    keys = QueueKeys("q")
    assert keys.processing_owner(b"{q}:processing:web-1:3") == ("web-1", "3")
    # A host name with ':' (an IPv6 address, say) still parses: the worker is the last field.
    assert keys.processing_owner("{q}:processing:fe80::1:standalone") == ("fe80::1", "standalone")
    assert keys.processing_pattern() == "{q}:processing:*"
    assert keys.processing_pattern("h*") == "{q}:processing:h\\*:*"
    assert QueueKeys("q[1]").processing_pattern("h") == "{q\\[1\\]}:processing:h:*"


# --- pure logic: the wire format


@pytest.fixture(params=["orjson", "stdlib"])
def json_backend(request, monkeypatch):
    """Run decoding tests with orjson (when installed) and with the stdlib fallback."""
    if request.param == "stdlib":
        monkeypatch.setattr(protocol, "_loads", lambda raw: json.loads(raw.decode("utf-8")))
        monkeypatch.setattr(protocol, "_JSON_ERRORS", (ValueError,))
    else:
        pytest.importorskip("orjson")
    return request.param


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'\xff\xfe{"type": "x"}', "invalid_utf8"),
        (b'{"type": "caf\xe9"}', "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"type": "x"} trailing', "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"type"', "not_an_object"),
        (b"null", "not_an_object"),
        (b'{"data": {}}', "bad_type"),
        (b'{"type": 5}', "bad_type"),
        (b'{"type": null}', "bad_type"),
        (b'{"type": ["email"]}', "bad_type"),
        (b'{"type": "x", "data": "' + b"a" * 200 + b'"}', "too_large"),
    ],
)
def test_decode_task_rejects_each_malformed_kind(json_backend, raw, reason):
    with pytest.raises(InvalidTask) as caught:
        decode_task(raw, max_payload_bytes=100)
    assert caught.value.reason == reason
    assert caught.value.detail
    assert str(caught.value).startswith(reason + ": ")


@pytest.mark.parametrize("depth", [2_000, 200_000])
def test_decode_task_nesting_too_deep_is_invalid_json(json_backend, depth):
    # The stdlib decoder raises RecursionError (not a ValueError) on deep nesting.
    raw = b'{"type":"t","data":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(InvalidTask) as caught:
        decode_task(raw, max_payload_bytes=len(raw))
    assert caught.value.reason == "invalid_json"
    assert caught.value.detail


def test_decode_task_accepts_tasks_and_keeps_unknown_fields(json_backend):
    raw = '{"type": "émail", "data": {"to": "a@b"}, "id": "1", "extra": [1]}'.encode()
    task = decode_task(raw, max_payload_bytes=len(raw))  # exactly at the limit is fine
    assert task == {"type": "émail", "data": {"to": "a@b"}, "id": "1", "extra": [1]}
    assert decode_task(b'{"type": ""}', 100) == {"type": ""}
    with pytest.raises(InvalidTask) as caught:
        decode_task(raw, max_payload_bytes=len(raw) - 1)
    assert caught.value.reason == "too_large"


def test_new_task_and_encode_round_trip():
    task = new_task("email", {"to": "x"}, priority=2)
    assert task["type"] == "email" and task["data"] == {"to": "x"} and task["priority"] == 2
    assert task["attempts"] == 0
    assert isinstance(task["id"], str) and task["id"]
    assert task["enqueued_at"] == pytest.approx(time.time(), abs=60)
    assert new_task("t")["data"] == {}
    assert new_task("t")["id"] != new_task("t")["id"]
    assert new_task("t", id="fixed", attempts=2)["attempts"] == 2
    assert decode_task(encode_task(task), 10_000) == task


def test_retry_delay_bounds():
    assert retry_delay(1, 0) == 0.0
    assert retry_delay(5, -1) == 0.0
    for attempts in range(1, 8):
        step = 0.2 * 2 ** (attempts - 1)
        delays = [retry_delay(attempts, 0.2) for _ in range(300)]
        assert all(0.5 * step <= d <= step for d in delays), attempts
        assert max(delays) - min(delays) > 0.1 * step  # jittered, not constant
    # The exponent is capped: a huge attempt count does not overflow.
    assert retry_delay(10_000, 1.0) <= 2**20


def test_dead_entry_keeps_non_utf8_bytes():
    raw = b'\xff{"type": "x"}\x80'
    entry = json.loads(dead_entry(raw, "invalid_utf8", "bad byte", 0, "h", "w"))
    assert entry["reason"] == "invalid_utf8"
    assert entry["error"] == "bad byte"
    assert (entry["attempts"], entry["host"], entry["worker"]) == (0, "h", "w")
    assert entry["failed_at"] == pytest.approx(time.time(), abs=60)
    assert "task_base64" in entry
    assert dead_entry_task(entry) == raw

    text = '{"type": "naïve"}'.encode()
    plain = json.loads(dead_entry(text, "bad_type", "", 1, "h", "w"))
    assert "task_base64" not in plain
    assert plain["task"] == text.decode()
    assert dead_entry_task(plain) == text


def test_settlement_args():
    settlement = Settlement()
    assert len(settlement) == 0
    assert settlement.args() == [settlement.token, protocol.SETTLED_TTL, 0]
    settlement.ack(b"a1")
    settlement.ack(b"a2")
    settlement.retry(b"r", b"r2", 12.5)
    settlement.dead(b"d", b"entry")
    assert len(settlement) == 4
    args = settlement.args()
    assert args[:5] == [settlement.token, protocol.SETTLED_TTL, 2, b"a1", b"a2"]
    kind, raw, member, score = args[5:9]
    assert (kind, raw, score) == (b"r", b"r", b"12.5")
    assert retry_member_task(member) == b"r2"
    assert args[9:] == [b"d", b"d", b"entry", b"0"]


def test_a_settlement_sent_again_after_a_lost_reply_is_not_applied_twice(
        queue, processing, redis_client):
    # Two identical tasks (the seed's format has no id) in flight in one worker; one is acked,
    # the reply is lost, the worker sends the same settlement again.
    twin = b'{"type":"same","data":{}}'
    queue.enqueue_many([twin, twin])
    assert queue.take(processing, 2) == [twin, twin]
    settlement = Settlement()
    settlement.ack(twin)
    queue.settle(processing, settlement)
    queue.settle(processing, settlement)  # the resend
    assert redis_client.lrange(processing, 0, -1) == [twin]  # the running copy stays
    other = Settlement()  # a new settlement is applied as usual
    other.ack(twin)
    queue.settle(processing, other)
    assert redis_client.llen(processing) == 0


def test_the_settled_marker_outlives_any_resend_and_does_not_pile_up(
        queue, processing, redis_client):
    """A worker resends a settlement until Redis answers, through outages of any length: the
    marker that makes a resend harmless must not expire after a minute (the resend would then
    remove a second, still running copy of an identical task). One marker per processing list,
    not one per call, so a long lifetime costs no memory."""
    twin = b'{"type":"same","data":{}}'
    queue.enqueue_many([twin] * 3)
    assert queue.take(processing, 3) == [twin] * 3
    for _ in range(2):
        settlement = Settlement()
        settlement.ack(twin)
        queue.settle(processing, settlement)
    markers = list(redis_client.scan_iter(match="{" + Q + "}:settled:*"))
    assert markers == [queue.keys.settled(processing).encode()]
    assert redis_client.ttl(markers[0]) > 23 * 3600
    queue.settle(processing, settlement)  # the last one, sent again much later
    assert redis_client.lrange(processing, 0, -1) == [twin]
    # Another worker's list has a marker of its own.
    other = queue.keys.processing(HOST, "w2")
    assert queue.keys.settled(other) != queue.keys.settled(processing)
    assert not queue.keys.settled(processing).startswith(queue.keys.prefix + ":processing:")


def test_settle_refusal_is_recognised_and_nothing_is_written(queue, processing, redis_client):
    queue.enqueue_many(raws("a"))
    [raw] = queue.take(processing, 1)
    settlement = Settlement()
    settlement.ack(raw)
    settlement.records += (b"r", raw, retry_member(raw), b"not-a-number")
    with pytest.raises(redis.ResponseError) as caught:
        queue.settle(processing, settlement)
    assert not protocol.is_temporary_error(caught.value)
    assert str(caught.value).startswith(protocol.SETTLE_REFUSED + " ")
    assert redis_client.lrange(processing, 0, -1) == [raw]
    assert redis_client.exists(queue.keys.settled(processing)) == 0
    # Errors that pass: the worker sends those again.
    for error in (redis.exceptions.OutOfMemoryError("command not allowed when used memory > "
                                                    "'maxmemory'."),
                  redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
                  redis.exceptions.ClusterDownError("The cluster is down"),
                  redis.exceptions.TryAgainError("Multiple keys request during rehashing"),
                  redis.ResponseError("BUSY Redis is busy running a script."),
                  redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
                  redis.ResponseError("ERR Error running script (call to f_0): @user_script:1:"
                                      " @user_script: 1: -OOM command not allowed")):
        assert protocol.is_temporary_error(error), error
    # Refusals that sending again cannot mend: the results go back to the queue instead.
    for error in (redis.exceptions.NoPermissionError("this user has no permissions to run the "
                                                     "'zadd' command"),
                  redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind "
                                      "of value")):
        assert not protocol.is_temporary_error(error), error


def test_settle_under_maxmemory_writes_nothing_and_applies_once_memory_is_back(
        make_redis_server):
    """OOM is a temporary refusal: the script fails at its first write, before any change,
    so the same settlement sent again once memory is freed is applied exactly once."""
    server = make_redis_server(extra_args=("--maxmemory-policy", "noeviction"))
    client = server.client()
    try:
        queue = SyncQueue(client, Q)
        processing = queue.keys.processing(HOST, "w1")
        queue.enqueue_many(raws("a", "b"))
        taken = queue.take(processing, 2)
        refuse_writes(client)
        settlement = Settlement()
        settlement.ack(taken[0])
        settlement.retry(taken[1], taken[1], time.time() + 60)
        with pytest.raises(redis.exceptions.OutOfMemoryError) as caught:
            queue.settle(processing, settlement)
        assert protocol.is_temporary_error(caught.value)
        assert client.lrange(processing, 0, -1) == list(reversed(taken))
        assert client.zcard(queue.keys.retry) == 0
        client.config_set("maxmemory", 0)
        queue.settle(processing, settlement)
        queue.settle(processing, settlement)  # a resend after a lost reply: nothing more
        assert client.llen(processing) == 0
        assert client.zcard(queue.keys.retry) == 1
    finally:
        client.close()


def test_settle_denied_a_command_midway_leaves_the_task_held_not_lost(make_redis_server):
    """A server whose ACL lacks ZADD refuses the retry of a settlement after the script has
    begun writing: the task must still be in its processing list (to run again)."""
    server = make_redis_server()
    admin = server.client()
    admin.acl_setuser("lacking", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-zadd"])
    client = redis.Redis(port=server.port, username="lacking", password="pw")
    try:
        queue = SyncQueue(client, Q)
        processing = queue.keys.processing(HOST, "w1")
        queue.enqueue_many(raws("acked", "retried"))
        acked, retried = queue.take(processing, 2)
        settlement = Settlement()
        settlement.ack(acked)
        settlement.retry(retried, retried, time.time() + 60)
        with pytest.raises(redis.ResponseError) as caught:  # NOPERM, or 7.0's wording
            queue.settle(processing, settlement)
        assert not protocol.is_temporary_error(caught.value)
        assert admin.lrange(processing, 0, -1) == [retried]  # held: requeued later, runs again
        assert admin.zcard(queue.keys.retry) == 0
    finally:
        client.close()
        admin.close()
