"""Handlers the tests run inside real workers; each records what it did in Redis.

Records go to the list `test:done` (one entry per completed run: the task's id) and
`test:started` (one entry per start), so a test can count deliveries across processes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import redis

_client: redis.Redis | None = None


def workerpool_setup(config) -> None:
    """Connect after fork, as every worker must."""
    global _client
    from workerpool.connection import sync_client

    _client = sync_client(config)  # any redis_url the pool accepts: embedded, TLS, unix...


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


async def gated(task: dict) -> None:
    """Start, then wait (without blocking the loop) until the file data.gate exists; succeed."""
    _mark("started", task)
    while not os.path.exists(task["data"]["gate"]):
        await asyncio.sleep(0.01)
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


# --- handlers with timestamps (tests/test_worker.py): each appends "<id> <attempts> <time>" or
# "<id> <start> <end>" so a test can measure latency, retry gaps and overlap.


def _stamp(kind: str, task: dict, *values: float) -> None:
    fields = [str(task.get("id")), *(repr(value) for value in values)]
    _redis().rpush(f"test:{kind}", " ".join(fields))


async def flaky_timed(task: dict) -> None:
    """flaky, also recording each start with its attempts and time in `test:starts`."""
    _stamp("starts", task, task.get("attempts", 0), time.time())
    await flaky(task)


async def record_time(task: dict) -> None:
    """record, also recording when it started in `test:times`."""
    _stamp("times", task, time.time())
    _mark("done", task)


def sync_window(task: dict) -> None:
    """sync_record, also recording its start and end times in `test:windows`."""
    start = time.time()
    time.sleep(float(task.get("data", {}).get("seconds", 0.01)))
    _stamp("windows", task, start, time.time())
    _mark("done", task)


async def file_record(task: dict) -> None:
    """Sleep data.seconds, then append the task's id to the file data.file: touches no Redis,
    so it keeps succeeding while Redis is down (results wait in the worker to be written)."""
    await asyncio.sleep(float(task["data"].get("seconds", 0)))
    with open(task["data"]["file"], "a", encoding="utf-8") as handle:
        handle.write(f"{task.get('id')}\n")


# --- handlers for tests/test_supervisor.py


async def jitter(task: dict) -> None:
    """Take 1-5 ms without blocking the loop, then succeed (load for chaos tests)."""
    await asyncio.sleep(random.uniform(0.001, 0.005))
    _mark("done", task)


# --- handlers for the multi-host tests (tests/redis_topologies.py): they touch no Redis, so
# they work unchanged on a Cluster, behind Sentinel, over TLS and as a restricted ACL user.


async def file_stamp(task: dict) -> None:
    """Sleep data.seconds, then append "<id> <start> <end> <pid>" to the file data.file
    (one short O_APPEND write: lines from many workers never interleave). data.failures:
    fail until attempted that many times; data.crash: kill the worker (every delivery)."""
    start = time.time()
    if task.get("attempts", 0) < int(task["data"].get("failures", 0)):
        raise RuntimeError(f"planned failure on attempt {task.get('attempts', 0) + 1}")
    if task["data"].get("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    seconds = float(task["data"].get("seconds", 0))
    if seconds:
        await asyncio.sleep(seconds)
    with open(task["data"]["file"], "a", encoding="utf-8") as handle:
        handle.write(f"{task.get('id')} {start!r} {time.time()!r} {os.getpid()}\n")


async def fail_by_type(task: dict) -> None:
    """Succeed for every type except `fail`, which always raises (metrics tests)."""
    if task["type"] == "fail":
        raise RuntimeError("planned failure")
    _mark("done", task)


# --- handlers that misbehave in the ways a correctness review found (tests/test_worker.py)


async def misbehave(task: dict) -> None:
    """Fail in the way data.how names, recording each start in `test:started`."""
    _mark("started", task)
    how = task["data"]["how"]
    if how == "cancel_self":  # a library cancelling an inner task and awaiting it
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await inner
    elif how == "mutate":  # change the dict the worker passed, then fail
        task.pop("type")
        task["data"] = {"unencodable": {1, 2}}
        raise RuntimeError("failed after mutating the task")
    elif how == "system_exit":
        raise SystemExit(3)
    elif how == "retry_nan":
        from workerpool.errors import RetryLater

        raise RetryLater("asked for a nonsense delay", delay=float("nan"))
    _mark("done", task)


def sync_stuck(task: dict) -> None:
    """A sync handler that outlives task_timeout the first time it runs for a task."""
    first = _redis().incr(f"test:runs:{task['id']}") == 1
    _mark("started", task)
    time.sleep(3 if first else 0)
    _mark("done", task)


async def record_then_die_after_settle(task: dict) -> None:
    """Succeed; the first worker to run one (data.marker not yet there) dies right after Redis
    applied its next batch of results, before it could count them."""
    marker = task["data"]["marker"]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        from workerpool.protocol import AsyncQueue

        settle = AsyncQueue.settle

        async def settle_then_die(self, processing, settlement):
            await settle(self, processing, settlement)
            os._exit(1)

        AsyncQueue.settle = settle_then_die
    _mark("done", task)
