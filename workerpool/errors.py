"""Exceptions a handler may raise to tell the worker how a task ended."""


class TaskRejected(Exception):
    """The task can never succeed (bad input, forbidden path): dead-letter it without retrying."""


class RetryLater(Exception):
    """Retry the task after `delay` seconds (or the usual backoff), counting an attempt."""

    def __init__(self, message: str = "retry requested", delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay
