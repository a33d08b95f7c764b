#!/usr/bin/env python3
"""Add or clear sample tasks, as the seed's script did: --action add|clear.

Uses the pool's own config (--config, $WORKERPOOL_CONFIG, ./workerpool.ini) unless
--redis-url/--redis-key are given.
"""

from __future__ import annotations

import argparse
import sys

from workerpool.config import ConfigError, load_config
from workerpool.connection import sync_client
from workerpool.producer import enqueue_many
from workerpool.protocol import SyncQueue

SAMPLE_TASKS = [
    ("email", {"to": "user@example.com", "subject": "Test subject", "body": "Test body"}),
    ("file_process", {"path": "example.txt", "operation": "checksum"}),
    ("unknown", {"note": "handled by the default branch"}),
]


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--action", choices=("add", "clear"), required=True)
    parser.add_argument("--count", type=int, default=1, help="copies of each sample task (add)")
    parser.add_argument("--config")
    parser.add_argument("--redis-url")
    parser.add_argument("--redis-key")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, overrides={"redis_url": args.redis_url,
                                                     "redis_key": args.redis_key})
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.action == "add":
        ids = enqueue_many(SAMPLE_TASKS * args.count, config=config)
        print(f"added {len(ids)} task(s) to {config.redis_key}")
        return 0
    queue = SyncQueue(sync_client(config), config.redis_key)
    print(f"cleared {queue.clear()} pending task(s) from {config.redis_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
