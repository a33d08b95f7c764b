"""workerpool: a multiprocess worker-pool daemon that runs JSON tasks from a Redis list."""

__version__ = "0.1.0"
