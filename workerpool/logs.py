"""Logging set-up shared by every process: the seed's line shape, each line naming its process."""

from __future__ import annotations

import logging
import logging.handlers
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(process_name)s: %(message)s"
logger = logging.getLogger("workerpool")
_process_name = "workerpool"


class _ProcessNameFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = _process_name
        return True


def set_process_name(name: str) -> None:
    """Name this process in every log line that follows (e.g. 'worker 2')."""
    global _process_name
    _process_name = name


def setup_logging(level: str = "INFO", log_file: str = "") -> logging.Handler:
    """Send workerpool's logs to stderr, or to `log_file` (reopened when logrotate moves it)."""
    handler: logging.Handler
    if log_file:
        handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_ProcessNameFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
