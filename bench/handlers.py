"""Handlers the benchmark runs inside real workers (imported by the supervisor before fork).

`latency` appends "<id> <time.time() - task["t"]>" to a file per worker process in
$BENCH_LATENCY_DIR;
the clock is read first thing, the write (one small O_APPEND write) comes after and is not part of
the measured figure.
"""

from __future__ import annotations

import asyncio
import os
import time

_fd = -1


async def noop(task: dict) -> None:
    """Do nothing at all."""


async def sleep_1ms(task: dict) -> None:
    """Await 1 ms without blocking the loop (an I/O-bound task)."""
    await asyncio.sleep(0.001)


def _out() -> int:
    global _fd
    if _fd < 0:
        path = os.path.join(os.environ["BENCH_LATENCY_DIR"], f"worker-{os.getpid()}.txt")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return _fd


async def latency(task: dict) -> None:
    """Record how long ago the producer pushed this task (task["t"], unix time)."""
    delay = time.time() - task["t"]
    os.write(_out(), b"%s %.9f\n" % (str(task["id"]).encode(), delay))
