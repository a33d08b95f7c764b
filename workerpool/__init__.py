"""workerpool: a multiprocess worker-pool daemon that runs JSON tasks from a Redis list."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["enqueue", "enqueue_async", "enqueue_many", "enqueue_many_async", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m workerpool.config` and friends do not import their own module twice.
    if name in __all__:
        from workerpool import producer

        return getattr(producer, name)
    raise AttributeError(f"module 'workerpool' has no attribute {name!r}")
