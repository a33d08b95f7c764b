"""The producer API: push tasks from application code, sync or asyncio.

    import workerpool
    task_id = workerpool.enqueue("email", {"to": "a@example.com", "subject": "hi", "body": "x"})
    ids = workerpool.enqueue_many([("file_process", {"path": "in/a.csv"}), ...])
    task_id = await workerpool.enqueue_async("email", {...})

Connections come from the same config as the pool (file, WORKERPOOL_* environment), or from
`redis_url=` / `redis_key=` / `config=` given here. The config is read at the first call and
one client per config and process is kept and reused; close() forgets both.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from workerpool.config import Config, load_config
from workerpool.connection import async_client, sync_client
from workerpool.protocol import AsyncQueue, SyncQueue, new_task

TaskSpec = tuple[str, Any] | dict[str, Any]

_lock = threading.Lock()
_sync_queues: dict[tuple[int, Config], SyncQueue] = {}
# The pool's config as found on disk and in the environment, read once per process (and per
# redis_url / redis_key given), not at every enqueue().
_found_configs: dict[tuple[str | None, str | None], Config] = {}


def _config(config: Config | None, redis_url: str | None, redis_key: str | None) -> Config:
    if config is None:
        with _lock:
            found = _found_configs.get((redis_url, redis_key))
            if found is None:
                found = _found_configs[(redis_url, redis_key)] = load_config(
                    None, overrides={"redis_url": redis_url, "redis_key": redis_key})
        return found
    if redis_url or redis_key:
        # Checked as the command line's values would be; every other setting (mode, TLS,
        # sentinels, password_file) stays the given config's.
        checked = load_config(None, search=False, environ={},
                              overrides={"redis_url": redis_url, "redis_key": redis_key})
        config = config.replace(**{name: getattr(checked, name) for name, value in (
            ("redis_url", redis_url), ("redis_key", redis_key)) if value})
    return config


def _tasks(specs: Iterable[TaskSpec]) -> list[dict[str, Any]]:
    tasks = []
    for spec in specs:
        if isinstance(spec, dict):
            fields = dict(spec)
            if not isinstance(fields.get("type"), str):
                raise ValueError(f"a task needs a string 'type': {spec!r}")
            tasks.append(new_task(fields.pop("type"), fields.pop("data", None), **fields))
        else:
            task_type, data = spec
            tasks.append(new_task(task_type, data))
    return tasks


def _sync_queue(config: Config) -> SyncQueue:
    # Keyed by pid too: a client must not be shared across fork. The whole config is in the
    # key: two configs on one URL may differ in mode, TLS or password.
    key = (os.getpid(), config)
    with _lock:
        queue = _sync_queues.get(key)
        if queue is None:
            queue = _sync_queues[key] = SyncQueue(sync_client(config), config.redis_key)
        return queue


def enqueue(
    task_type: str,
    data: Any = None,
    *,
    config: Config | None = None,
    redis_url: str | None = None,
    redis_key: str | None = None,
    wait_replicas: int = 0,
    wait_timeout: float = 10.0,
    **fields: Any,
) -> str:
    """Push one task; returns its id. Extra keyword fields become top-level task fields.

    wait_replicas=N waits (up to wait_timeout s) until N replicas hold the write (Redis WAIT)
    and raises TimeoutError if fewer do; the task is queued either way.
    """
    task = new_task(task_type, data, **fields)
    queue = _sync_queue(_config(config, redis_url, redis_key))
    queue.enqueue_many([task], wait_replicas=wait_replicas, wait_timeout=wait_timeout)
    return task["id"]


def enqueue_many(
    tasks: Iterable[TaskSpec],
    *,
    config: Config | None = None,
    redis_url: str | None = None,
    redis_key: str | None = None,
    wait_replicas: int = 0,
    wait_timeout: float = 10.0,
) -> list[str]:
    """Push many tasks ((type, data) pairs or task dicts) in chunks; their ids."""
    built = _tasks(tasks)
    queue = _sync_queue(_config(config, redis_url, redis_key))
    queue.enqueue_many(built, wait_replicas=wait_replicas, wait_timeout=wait_timeout)
    return [task["id"] for task in built]


async def enqueue_async(
    task_type: str,
    data: Any = None,
    *,
    config: Config | None = None,
    redis_url: str | None = None,
    redis_key: str | None = None,
    wait_replicas: int = 0,
    wait_timeout: float = 10.0,
    **fields: Any,
) -> str:
    """asyncio version of enqueue(); returns the task id."""
    return (await enqueue_many_async([{"type": task_type, "data": data, **fields}],
                                     config=config, redis_url=redis_url, redis_key=redis_key,
                                     wait_replicas=wait_replicas,
                                     wait_timeout=wait_timeout))[0]


async def enqueue_many_async(
    tasks: Iterable[TaskSpec],
    *,
    config: Config | None = None,
    redis_url: str | None = None,
    redis_key: str | None = None,
    wait_replicas: int = 0,
    wait_timeout: float = 10.0,
) -> list[str]:
    """asyncio version of enqueue_many(); a client is opened and closed per call."""
    built = _tasks(tasks)
    resolved = _config(config, redis_url, redis_key)
    client = async_client(resolved)
    try:
        await AsyncQueue(client, resolved.redis_key).enqueue_many(
            built, wait_replicas=wait_replicas, wait_timeout=wait_timeout)
    finally:
        await client.aclose()
    return [task["id"] for task in built]


def close() -> None:
    """Close the clients enqueue() keeps (e.g. before fork, or at exit)."""
    with _lock:
        for queue in _sync_queues.values():
            queue.client.close()
        _sync_queues.clear()
        _found_configs.clear()
