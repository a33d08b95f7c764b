"""workerpool: a multiprocess worker-pool daemon that runs JSON tasks from a Redis list."""

from workerpool.producer import enqueue, enqueue_async, enqueue_many, enqueue_many_async

__version__ = "0.1.0"
__all__ = ["enqueue", "enqueue_async", "enqueue_many", "enqueue_many_async", "__version__"]
