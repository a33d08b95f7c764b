"""`python manage.py async_command`: the seed's command, running workerpool's supervisor.

Same name and flags as the seed (`--redis-key`, `--interval`, `--max-tasks`), plus `--workers`,
`--concurrency`, `--redis-url` and `--config`. Settings come from, highest first: the command
line, the environment (WORKERPOOL_*), settings.WORKERPOOL (a dict of config keys), the INI file
(--config, else $WORKERPOOL_CONFIG, else settings.WORKERPOOL_CONFIG), the defaults.

The pool runs in the foreground (no daemonizing). Database connections are closed before each
fork, every worker calls django.setup(), and a sync handler is wrapped so that each task starts
and ends with django.db.close_old_connections(), as a request does: the ORM is safe to use in
it (it runs in one of the worker's threads).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import django
from django import db
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from workerpool import daemon, embedded
from workerpool.config import (
    ENV_PREFIX,
    Config,
    ConfigError,
    load_config,
    load_handler,
    warn_if_secret_readable,
)
from workerpool.logs import setup_logging
from workerpool.supervisor import Supervisor, check_redis
from workerpool.worker import _is_async

EXIT_FAILURE, EXIT_USAGE = 1, 2
SETTINGS_NAME = "settings.WORKERPOOL"
_OVERRIDES = ("redis_url", "redis_key", "interval", "max_tasks", "workers", "concurrency")
_ORM_SAFE = "__workerpool_orm_safe__"


def orm_safe(handler: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Wrap a sync handler: close_old_connections() before and after each task.

    The wrapper stays sync (the worker runs it in a thread) and keeps the handler's
    __module__, so the worker still finds the module's `workerpool_setup`. Async handlers
    are returned unchanged (they must reach the ORM through sync_to_async or Django's a*
    methods).
    """
    if _is_async(handler) or getattr(handler, _ORM_SAFE, False):
        return handler

    @functools.wraps(handler)
    def run(task: dict) -> Any:
        db.close_old_connections()
        try:
            return handler(task)
        finally:
            db.close_old_connections()

    setattr(run, _ORM_SAFE, True)
    run.__module__ = getattr(handler, "__module__", run.__module__)
    return run


def close_connections() -> None:
    """Before a fork: a child must never share the parent's database sockets."""
    db.connections.close_all()


def _restore_logging(config: Config, disabled: dict[str, bool]) -> None:
    # django.setup() re-applies settings.LOGGING: it closes our handlers and, with
    # disable_existing_loggers (dictConfig's default), would silence workerpool's loggers and
    # the handler's. Keep what the supervisor had.
    setup_logging(config.log_level, config.log_file)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.disabled = disabled.get(name, False)


class DjangoSupervisor(Supervisor):
    """The supervisor with Django's fork hygiene; every handler it runs is ORM-safe."""

    def __init__(self, config: Config, handler: Callable[[dict], Any], **kwargs: Any) -> None:
        kwargs.setdefault("before_fork", close_connections)
        kwargs.setdefault("after_fork", self._setup_django)
        super().__init__(config, handler, **kwargs)

    @property
    def handler(self) -> Callable[[dict], Any]:
        return self._handler

    @handler.setter
    def handler(self, value: Callable[[dict], Any]) -> None:
        # Also catches the handler a SIGHUP reload imports.
        self._handler = orm_safe(value)

    def _setup_django(self) -> None:
        disabled = {name: logger.disabled
                    for name, logger in logging.root.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger)}
        django.setup()  # apps are ready already: this re-applies logging and the script prefix
        _restore_logging(self.config, disabled)


def build_config(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """The Config from the command line, WORKERPOOL_*, settings.WORKERPOOL and the INI file."""
    environ = os.environ if environ is None else environ
    from_settings = getattr(settings, "WORKERPOOL", None)
    if from_settings is not None and not isinstance(from_settings, Mapping):
        raise ConfigError(f"{SETTINGS_NAME} = {from_settings!r}: expected a dict of config keys, "
                          "e.g. {'redis_url': 'redis://127.0.0.1:6379/0', 'workers': 2}")
    path_setting = getattr(settings, "WORKERPOOL_CONFIG", None)
    if path_setting is not None and not isinstance(path_setting, (str, os.PathLike)):
        raise ConfigError(f"settings.WORKERPOOL_CONFIG = {path_setting!r}: expected a file path")
    path = options.get("config") or environ.get(ENV_PREFIX + "CONFIG") or path_setting or None
    return load_config(
        os.fspath(path) if path else None,
        environ=environ,
        overrides={name: options.get(name) for name in _OVERRIDES},
        search=False,
        settings=from_settings,
        settings_name=SETTINGS_NAME,
    )


class Command(BaseCommand):
    help = ("Run tasks from a Redis list with a pool of worker processes "
            "(workerpool; settings.WORKERPOOL).")

    def add_arguments(self, parser: CommandParser) -> None:
        # Values stay strings: the config checks them and names the flag in its message.
        parser.add_argument("--redis-key", dest="redis_key",
                            help="the Redis list to take tasks from (default: async_tasks)")
        parser.add_argument("--interval",
                            help="seconds a worker blocks on an empty queue (default: 1)")
        parser.add_argument("--max-tasks", dest="max_tasks",
                            help="stop after exactly this many finished tasks (default: no limit)")
        parser.add_argument("--workers", help="worker processes (default: 2)")
        parser.add_argument("--concurrency", help="tasks in flight per worker (default: 10)")
        parser.add_argument("--redis-url", dest="redis_url",
                            help="redis://[user:password@]host[:port][/db], rediss://, unix://")
        parser.add_argument("--config", help="INI file (default: $WORKERPOOL_CONFIG, else "
                            "settings.WORKERPOOL_CONFIG, else none)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = build_config(options)
            handler = load_handler(config)  # before fork: the workers share the imported code
        except ConfigError as exc:
            raise CommandError(f"config error: {exc}", returncode=EXIT_USAGE) from None
        # A pidfile only when one is configured: then `workerpool status|stop|reload` with the
        # same config find this pool.
        use_pidfile = "pidfile" in config.origins
        if use_pidfile:
            state, pid = daemon.pidfile_state(config.pidfile)
            if state == "running":
                self.stdout.write(f"workerpool already running (pid {pid})")
                return
        warning = warn_if_secret_readable(config)
        if warning:
            self.stderr.write(f"warning: {warning}")
        try:
            if config.redis_url == "embedded" and embedded.start(config):
                self.stdout.write(f"started embedded redis on {embedded.socket_path(config)}")
            problem = check_redis(config)
        except ConfigError as exc:  # e.g. an unreadable password_file, an unusable run_dir
            raise CommandError(f"config error: {exc}", returncode=EXIT_USAGE) from None
        except embedded.EmbeddedRedisError as exc:
            raise CommandError(str(exc), returncode=EXIT_FAILURE) from None
        if problem:
            raise CommandError(problem, returncode=EXIT_FAILURE)
        setup_logging(config.log_level, config.log_file)

        pidfile: daemon.PidFile | None = None
        if use_pidfile:
            pidfile = daemon.PidFile(config.pidfile)
            try:
                pidfile.acquire()
            except daemon.AlreadyRunning as exc:
                self.stdout.write(f"workerpool already running (pid {exc.pid})")
                return
            except OSError as exc:
                self.stderr.write(f"warning: no pidfile ({config.pidfile}: {exc.strerror})")
                pidfile = None

        def reload_config() -> Config:
            return build_config(options)

        status_file = daemon.status_path(config.pidfile) if pidfile is not None else None
        try:
            supervisor = DjangoSupervisor(config, handler, reload_config=reload_config,
                                          status_file=status_file)
            code = supervisor.run()
        finally:
            # The embedded server goes last, after every worker has written its results.
            if config.redis_url == "embedded":
                embedded.stop(config)
            if pidfile is not None:
                pidfile.release()
        if code:
            sys.exit(code)
