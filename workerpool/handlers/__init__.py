"""The built-in default handler: the seed's task types `email` and `file_process`.

The worker calls `workerpool_setup(config)` once per process; tasks then use the [email] and
[file_process] settings. Bad input raises TaskRejected (dead-lettered at once); anything else
that goes wrong (SMTP server down, disk full) propagates and the worker retries the task.

This package holds the dispatcher; each task type is its own module: `mail` (email) and
`files` (file_process).
"""

from __future__ import annotations

import logging

from workerpool.config import Config, load_config
from workerpool.errors import TaskRejected
from workerpool.handlers import files, mail

log = logging.getLogger("workerpool.handlers")

_settings: Config | None = None


def workerpool_setup(config: Config) -> None:
    """Keep the validated config for this worker process's tasks."""
    global _settings
    _settings = config


def _config() -> Config:
    global _settings
    if _settings is None:  # called without a worker (tests, scripts): plain defaults
        _settings = load_config(None, search=False)
    return _settings


async def async_handle(task: dict) -> None:
    """Run one decoded task according to its type."""
    if not isinstance(task, dict):
        raise TaskRejected("a task must be a JSON object")
    config = _config()
    kind = task.get("type")
    if kind == "email":
        await mail.send_email(config, _data(task, kind))
    elif kind == "file_process":
        await files.process_file(config, _data(task, kind))
    elif config.unknown_types == "dead":
        raise TaskRejected(f"unknown task type {kind!r}")
    else:
        try:
            data = repr(task.get("data"))
        except RecursionError:  # nested deeper than repr() goes: still a task to acknowledge
            data = "<data nested too deeply to show>"
        log.info("task of unknown type %r acknowledged: %s", kind,
                 data if len(data) <= 200 else data[:197] + "...")


def _data(task: dict, kind: str) -> dict:
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskRejected(f"{kind} task: data must be a JSON object, not {type(data).__name__}")
    return data
