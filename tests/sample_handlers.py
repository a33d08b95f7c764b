"""Handlers the tests run inside real workers; each records what it did in Redis.

Records go to the list `test:done` (one entry per completed run: the task's id) and
`test:started` (one entry per start), so a test can count deliveries across processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis

_client: redis.Redis | None = None


def workerpool_setup(config) -> None:
    """Connect after fork, as every worker must."""
    global _client
    _client = redis.Redis.from_url(config.redis_url)


def _redis() -> redis.Redis:
    assert _client is not None, "workerpool_setup was not called"
    return _client


def _mark(kind: str, task: dict) -> None:
    _redis().rpush(f"test:{kind}", str(task.get("id", task.get("data"))))


async def record(task: dict) -> None:
    """Succeed at once."""
    _mark("done", task)


async def noop(task: dict) -> None:
    """Do nothing at all (benchmarks)."""


def sync_record(task: dict) -> None:
    """A blocking handler: sleeps a little in its thread, then succeeds."""
    time.sleep(float(task.get("data", {}).get("seconds", 0.01)))
    _mark("done", task)


async def slow(task: dict) -> None:
    """Sleep data.seconds without blocking the loop, then succeed."""
    _mark("started", task)
    await asyncio.sleep(float(task["data"]["seconds"]))
    _mark("done", task)


async def flaky(task: dict) -> None:
    """Fail until the task has been attempted data.failures times, then succeed."""
    _mark("started", task)
    if task.get("attempts", 0) < int(task["data"].get("failures", 1 << 30)):
        raise RuntimeError(f"planned failure on attempt {task.get('attempts', 0) + 1}")
    _mark("done", task)


async def block_loop(task: dict) -> None:
    """Block the event loop (a sync call in an async handler) when data.block is set."""
    _mark("started", task)
    if task.get("data", {}).get("block"):
        time.sleep(3600)
    _mark("done", task)


async def crash(task: dict) -> None:
    """Kill the worker process when data.crash is set (a poison pill)."""
    _mark("started", task)
    if task.get("data", {}).get("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    _mark("done", task)
