"""The Prometheus endpoint against a known load, through a real pool and a real Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import alive, children, wait_for
from redis_server import free_port

from workerpool.protocol import SyncQueue, new_task

pytest.importorskip("prometheus_client")
TESTS = os.path.dirname(os.path.abspath(__file__))


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


@pytest.fixture
def pool(write_config, redis_url, tmp_path, reaper):
    port = free_port()
    ini = write_config({
        "redis_url": redis_url, "handler": "sample_handlers:fail_by_type", "workers": 2,
        "max_retries": 1, "retry_backoff": 0.05, "pidfile": tmp_path / "wp.pid",
        "log_level": "info", "drain_timeout": 5,
    }, metrics={"port": port})
    process = subprocess.Popen(
        [sys.executable, "-m", "workerpool.cli", "--config", ini, "start", "--foreground"],
        env={**os.environ, "PYTHONPATH": TESTS}, stderr=open(tmp_path / "log", "w"))
    reaper.add(process.pid)
    yield port, process
    process.terminate()
    try:
        assert process.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError((tmp_path / "log").read_text()[-4000:]) from None


def test_metrics_match_a_known_load(pool, redis_client):
    port, _ = pool
    wait_for(lambda: _up(port), timeout=15)
    queue = SyncQueue(redis_client, "async_tasks")
    queue.enqueue_many([new_task("ok", {}, id=f"ok{n}") for n in range(10)]
                       + [new_task("fail", {}, id=f"bad{n}") for n in range(3)]
                       + [b"not json", b'{"no": "type"}'])
    # Each `fail` task runs twice (max_retries 1), then is dead; the 2 non-tasks are dead too.
    wait_for(lambda: queue.counts()["dead"] == 5 and redis_client.llen("test:done") == 10,
             timeout=20)

    def settled() -> dict[str, float] | None:
        samples = scrape(port)  # workers publish about once a second
        return samples if samples.get('workerpool_tasks_dead_total{type="fail"}') == 3 else None

    samples = wait_for(settled, timeout=10)
    assert samples['workerpool_tasks_taken_total{type="ok"}'] == 10
    assert samples['workerpool_tasks_succeeded_total{type="ok"}'] == 10
    assert samples['workerpool_tasks_failed_total{type="ok"}'] == 0
    assert samples['workerpool_tasks_taken_total{type="fail"}'] == 6
    assert samples['workerpool_tasks_failed_total{type="fail"}'] == 6
    assert samples['workerpool_tasks_retried_total{type="fail"}'] == 3
    assert samples['workerpool_tasks_dead_total{type="(invalid)"}'] == 2
    assert samples["workerpool_task_duration_seconds_count"] == 16
    assert samples['workerpool_task_duration_seconds_bucket{le="+Inf"}'] == 16
    assert samples["workerpool_workers"] == 2
    assert samples["workerpool_in_flight"] == 0
    assert samples["workerpool_pending"] == 0
    assert samples["workerpool_dead"] == 5


def test_unknown_path_is_404(pool):
    port, _ = pool
    wait_for(lambda: _up(port), timeout=15)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
    assert error.value.code == 404


def test_metrics_port_in_use_fails_start(write_config, redis_url, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        ini = write_config({"redis_url": redis_url, "pidfile": tmp_path / "wp.pid"},
                           metrics={"port": port})
        result = subprocess.run(
            [sys.executable, "-m", "workerpool.cli", "--config", ini, "start", "--foreground"],
            env={**os.environ, "PYTHONPATH": TESTS}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def _up(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_idle_clients_do_not_stall_the_supervisor(pool):
    import socket
    import time

    port, _ = pool
    wait_for(lambda: _up(port), timeout=15)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
    try:
        started = time.monotonic()
        samples = scrape(port)  # queued behind six clients that never send a request
        elapsed = time.monotonic() - started
    finally:
        for connection in idle:
            connection.close()
    assert "workerpool_workers" in samples
    # Read with a 2 s timeout each, the six held the scrape (and the loop) 12 s.
    assert elapsed < 3.5, elapsed


def test_workers_do_not_keep_the_metrics_port(write_config, redis_url, redis_client, tmp_path,
                                              reaper):
    import signal
    import socket
    import time

    port = free_port()
    ini = write_config({
        "redis_url": redis_url, "handler": "sample_handlers:slow", "workers": 1,
        "pidfile": tmp_path / "wp.pid", "drain_timeout": 10,
    }, metrics={"port": port})
    process = subprocess.Popen(
        [sys.executable, "-m", "workerpool.cli", "--config", ini, "start", "--foreground"],
        env={**os.environ, "PYTHONPATH": TESTS}, stderr=open(tmp_path / "log", "w"))
    reaper.add(process.pid)
    wait_for(lambda: _up(port), timeout=15)
    SyncQueue(redis_client, "async_tasks").enqueue(new_task("slow", {"seconds": 4}, id="s"))
    wait_for(lambda: redis_client.lrange("test:started", 0, -1) == [b"s"], timeout=10)
    workers = children(process.pid)
    assert len(workers) == 1
    for pid in workers:
        reaper.add(pid)
    process.kill()  # the supervisor dies; its worker finishes its task, orphaned
    process.wait(10)
    with socket.socket() as successor:
        successor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        successor.bind(("127.0.0.1", port))  # EADDRINUSE while a worker held the listener
        assert all(alive(pid) for pid in workers)  # bound while the worker still lives
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the orphaned worker did not exit"
        time.sleep(0.05)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

