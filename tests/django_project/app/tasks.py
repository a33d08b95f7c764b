"""The test project's handler: a sync function that writes through the ORM."""

import os

from app.models import TaskRecord

_queue = None


def workerpool_setup(config) -> None:
    """Called once per worker after fork; the handler refuses to run without it."""
    global _queue
    _queue = config.redis_key


def handle(task: dict) -> None:
    if _queue is None:
        raise RuntimeError("workerpool_setup was not called")
    TaskRecord.objects.get_or_create(
        task_id=str(task["id"]),
        defaults={"kind": task["type"], "queue": _queue, "worker_pid": os.getpid()},
    )
