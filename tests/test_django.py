"""The Django app: `manage.py async_command` runs the pool on a real Redis and writes via the ORM.

Every manage.py runs as a subprocess of the project in tests/django_project, with its SQLite
database in tmp_path and the session's private Redis (never port 6379).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

import redis  # noqa: E402
from conftest import ProcessReaper, wait_for  # noqa: E402
from redis_server import free_port  # noqa: E402

from workerpool.protocol import SyncQueue, new_task  # noqa: E402
from workerpool.worker import _is_async  # noqa: E402

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent / "django_project"
REPO = PROJECT.parent.parent
TIMEOUT = 60.0


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Project:
    """The test project with its own database; runs manage.py commands with timeouts."""

    def __init__(self, tmp_path: Path, redis_url: str, reaper: ProcessReaper) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "db.sqlite3"
        self.redis_url = redis_url
        self.reaper = reaper
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith(("WORKERPOOL_", "TESTPROJECT_", "DJANGO_"))}
        self.env.update(
            TESTPROJECT_DB=str(self.db),
            TESTPROJECT_REDIS_URL=redis_url,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )

    def start(self, *args: str, env: dict[str, str] | None = None,
              settings: dict[str, Any] | None = None) -> subprocess.Popen:
        environ = dict(self.env, **(env or {}))
        if settings is not None:
            environ["TESTPROJECT_WORKERPOOL"] = json.dumps(settings)
        proc = subprocess.Popen(
            [sys.executable, str(PROJECT / "manage.py"), *args], cwd=self.dir, env=environ,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reaper.add(proc.pid)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = TIMEOUT) -> Result:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # QUIT: the supervisor kills its workers at once (their tasks go back to the queue).
            proc.send_signal(signal.SIGQUIT)
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"{proc.args} did not finish within {timeout:g}s\n{err}")
        return Result(proc.returncode, out, err)

    def run(self, *args: str, env: dict[str, str] | None = None,
            settings: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> Result:
        return self.finish(self.start(*args, env=env, settings=settings), timeout)

    def rows(self) -> list[tuple[str, str, str]]:
        if not self.db.exists():
            return []
        with sqlite3.connect(self.db, timeout=30) as connection:
            return connection.execute(
                "SELECT task_id, kind, queue FROM app_taskrecord ORDER BY task_id").fetchall()

    def enqueue(self, key: str, ids: list[str]) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            SyncQueue(client, key).enqueue_many([new_task("record", {"n": i}, id=task_id)
                                                 for i, task_id in enumerate(ids)])
        finally:
            client.close()

    def counts(self, key: str) -> dict[str, int]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return SyncQueue(client, key).counts()
        finally:
            client.close()


@pytest.fixture
def project(tmp_path: Path, redis_url: str, reaper: ProcessReaper) -> Project:
    project = Project(tmp_path, redis_url, reaper)
    result = project.run("migrate", "--no-input")
    assert result.returncode == 0, result.stderr
    return project


def _ok(result: Result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"


def test_max_tasks_50_with_orm_writes(project: Project) -> None:
    ids = [f"task-{n:02d}" for n in range(60)]
    project.enqueue("async_tasks", ids)
    result = project.run("async_command", "--max-tasks", "50", "--workers", "2")
    _ok(result)
    rows = project.rows()
    assert len(rows) == 50
    assert {kind for _, kind, _ in rows} == {"record"}
    # workerpool_setup ran in every worker, through the ORM-safe wrapper.
    assert {queue for _, _, queue in rows} == {"async_tasks"}
    counts = project.counts("async_tasks")
    assert counts["pending"] == 10
    assert counts["processing"] == 0
    assert counts["retry"] == 0 and counts["dead"] == 0
    assert "with 2 worker(s) x 4 concurrency" in result.stderr  # concurrency from settings
    assert "max_tasks" in result.stderr
    # The workers still log after their django.setup() re-applied settings.LOGGING.
    assert "worker stopped (max_tasks reached)" in result.stderr


@pytest.mark.parametrize(
    ("env_key", "cli_key", "expected"),
    [
        (None, None, "from_settings"),  # settings.WORKERPOOL is used
        ("from_env", None, "from_env"),  # WORKERPOOL_* beats settings
        ("from_env", "from_cli", "from_cli"),  # the command line beats both
    ],
)
def test_precedence(project: Project, env_key: str | None, cli_key: str | None,
                    expected: str) -> None:
    keys = ["from_settings", "from_env", "from_cli"]
    for key in keys:
        project.enqueue(key, [f"{key}-{n}" for n in range(2)])
    args = ["async_command", "--max-tasks", "2"]
    if cli_key:
        args += ["--redis-key", cli_key]
    env = {"WORKERPOOL_REDIS_KEY": env_key} if env_key else {}
    _ok(project.run(*args, env=env, settings={"redis_key": "from_settings"}))
    rows = project.rows()
    assert [task_id for task_id, _, _ in rows] == [f"{expected}-0", f"{expected}-1"]
    assert {queue for _, _, queue in rows} == {expected}
    for key in keys:
        assert project.counts(key)["pending"] == (0 if key == expected else 2)


def test_ini_file_under_settings(project: Project, write_config) -> None:
    path = write_config({"redis_key": "from_ini", "concurrency": 3, "workers": 1})
    project.enqueue("from_ini", ["a", "b"])
    # settings.WORKERPOOL (concurrency 4) beats the file; the file's redis_key still applies.
    result = project.run("async_command", "--config", path, "--max-tasks", "2",
                         settings={"workers": None})
    _ok(result)
    assert [queue for _, _, queue in project.rows()] == ["from_ini", "from_ini"]
    assert "with 1 worker(s) x 4 concurrency" in result.stderr


def test_seed_flags(project: Project) -> None:
    help_text = project.run("async_command", "--help")
    _ok(help_text)
    for flag in ("--redis-key", "--interval", "--max-tasks", "--workers", "--concurrency",
                 "--config", "--redis-url"):
        assert flag in help_text.stdout
    project.enqueue("my_tasks", ["one", "two", "three"])
    result = project.run("async_command", "--redis-key", "my_tasks", "--interval", "2",
                         "--max-tasks", "3")
    _ok(result)
    assert [task_id for task_id, _, _ in project.rows()] == ["one", "three", "two"]
    assert "redis key: my_tasks; interval: 2s; max tasks: 3" in result.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"interval": "soon"}, "settings.WORKERPOOL['interval']: interval = 'soon': expected a"),
        ({"colour": "blue"}, "settings.WORKERPOOL: unknown key 'colour'"),
        ({"handler": "app.tasks:missing"}, "settings.WORKERPOOL handler = 'app.tasks:missing'"),
    ],
)
def test_bad_setting(project: Project, settings: dict[str, Any], message: str) -> None:
    result = project.run("async_command", "--max-tasks", "1", settings=settings)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_command_line_value(project: Project) -> None:
    result = project.run("async_command", "--interval", "soon")
    assert result.returncode == 2
    assert "command line --interval: interval = 'soon'" in result.stderr


def test_redis_unreachable(project: Project) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    result = project.run("async_command", "--redis-url", url, "--max-tasks", "1")
    assert result.returncode == 1
    assert "cannot connect to redis at redis://:***@127.0.0.1:" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_sigterm_drains_and_exits_0(project: Project) -> None:
    project.enqueue("async_tasks", [f"t{n}" for n in range(5)])
    pidfile = project.dir / "run" / "workerpool.pid"
    proc = project.start("async_command", "--workers", "1", settings={"pidfile": str(pidfile)})
    wait_for(lambda: len(project.rows()) == 5 or proc.poll() is not None, timeout=TIMEOUT)
    assert proc.poll() is None, proc.communicate()[1]
    # A configured pidfile names the foreground pool, for `workerpool status|stop`.
    assert pidfile.read_text().strip() == str(proc.pid)
    proc.send_signal(signal.SIGTERM)
    result = project.finish(proc)
    _ok(result)
    assert "SIGTERM received" in result.stderr
    counts = project.counts("async_tasks")
    assert (counts["pending"], counts["processing"], counts["retry"], counts["dead"]) == (0, 0,
                                                                                       0, 0)
    assert len(project.rows()) == 5
    assert not pidfile.exists()


def test_embedded_redis(project: Project, tmp_path: Path) -> None:
    from workerpool import embedded
    from workerpool.config import load_config

    settings = {"redis_url": "embedded", "run_dir": str(tmp_path / "run"),
                "state_dir": str(tmp_path / "state")}
    config = load_config(None, environ={}, search=False, settings=settings)
    try:
        embedded.start(config)  # the command adopts a running server, as `workerpool start` does
        client = redis.Redis(unix_socket_path=embedded.socket_path(config))
        try:
            SyncQueue(client, "async_tasks").enqueue_many(
                [new_task("record", {}, id=f"e{n}") for n in range(3)])
        finally:
            client.close()
        _ok(project.run("async_command", "--max-tasks", "3", settings=settings))
        assert len(project.rows()) == 3
        assert not embedded.is_running(config)  # stopped after the workers
    finally:
        embedded.stop(config, timeout=10)


# --- the ORM-safe wrapper, in-process


def test_orm_safe_wraps_sync_handlers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import django.db

    from workerpool.contrib.django.management.commands import async_command

    calls: list[str] = []
    monkeypatch.setattr(django.db, "close_old_connections", lambda: calls.append("close"))

    def handle(task: dict) -> str:
        calls.append("run")
        if task.get("fail"):
            raise ValueError("boom")
        return "done"

    wrapped = async_command.orm_safe(handle)
    assert wrapped is not handle
    assert not _is_async(wrapped)  # still runs in a worker thread
    assert wrapped.__module__ == handle.__module__  # workerpool_setup stays reachable
    assert async_command.orm_safe(wrapped) is wrapped
    assert wrapped({"type": "x"}) == "done"
    assert calls == ["close", "run", "close"]
    calls.clear()
    with pytest.raises(ValueError):
        wrapped({"type": "x", "fail": True})
    assert calls == ["close", "run", "close"]

    async def async_handle(task: dict) -> None:
        await asyncio.sleep(0)

    assert async_command.orm_safe(async_handle) is async_handle
