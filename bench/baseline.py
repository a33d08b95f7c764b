"""The same-run baselines: minimal reliable consumers, no framework around them.

    python -m bench.baseline batch URL KEY NAME [--batch 100] [--max-seconds 120]
        A batched reliable consumer: one Lua script moves up to --batch tasks from the queue to
        its own processing list (LRANGE/LTRIM/LPUSH), each task is decoded (orjson) and passed to
        a no-op, then the batch is acked in one pipelined round trip (one LREM per task). It exits
        when the queue is empty. Prints how many tasks it handled.

    python -m bench.baseline blmove URL KEY NAME COUNT OUT [--max-seconds 60]
        An idle consumer blocked on BLMOVE (queue -> processing list) that records, for each task,
        time.time() - task["t"] right after the move returns, acks it (LREM), and writes the COUNT
        "<id> <delay>" lines to OUT once it has them all (or at --max-seconds).

Both keep every task in a processing list until it is acked, as workerpool does: at-least-once,
the ceiling any reliable Redis-list consumer works under.
"""

from __future__ import annotations

import argparse
import sys
import time

import redis

try:
    from orjson import loads
except ImportError:  # pragma: no cover
    from json import loads

TAKE = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
if #items == 0 then return items end
redis.call('LTRIM', KEYS[1], 0, -#items - 1)
redis.call('LPUSH', KEYS[2], unpack(items))
return items
"""


def _noop(task: dict) -> None:
    return None


def batch(url: str, key: str, name: str, size: int, max_seconds: float) -> int:
    client = redis.Redis.from_url(url)
    processing = f"{{{key}}}:baseline:{name}"
    take = client.register_script(TAKE)
    deadline = time.monotonic() + max_seconds
    done = 0
    while time.monotonic() < deadline:
        items = take(keys=[key, processing], args=[size])
        if not items:
            break
        for raw in items:
            _noop(loads(raw))
        pipe = client.pipeline(transaction=False)
        for raw in items:
            pipe.lrem(processing, -1, raw)
        pipe.execute()
        done += len(items)
    client.close()
    print(done)
    return 0


def blmove(url: str, key: str, name: str, count: int, out: str, max_seconds: float) -> int:
    client = redis.Redis.from_url(url, socket_timeout=10)
    processing = f"{{{key}}}:baseline:{name}"
    delays: list[tuple[str, float]] = []
    deadline = time.monotonic() + max_seconds
    while len(delays) < count and time.monotonic() < deadline:
        raw = client.blmove(key, processing, 1, "RIGHT", "LEFT")
        if raw is None:
            continue
        task = loads(raw)
        delays.append((task["id"], time.time() - task["t"]))
        client.lrem(processing, -1, raw)
    client.close()
    with open(out, "w", encoding="ascii") as handle:
        handle.writelines(f"{task_id} {delay:.9f}\n" for task_id, delay in delays)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("batch")
    one.add_argument("url")
    one.add_argument("key")
    one.add_argument("name")
    one.add_argument("--batch", type=int, default=100)
    one.add_argument("--max-seconds", type=float, default=120.0)
    two = commands.add_parser("blmove")
    two.add_argument("url")
    two.add_argument("key")
    two.add_argument("name")
    two.add_argument("count", type=int)
    two.add_argument("out")
    two.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.command == "batch":
        return batch(args.url, args.key, args.name, args.batch, args.max_seconds)
    return blmove(args.url, args.key, args.name, args.count, args.out, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
