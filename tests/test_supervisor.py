"""The supervisor through the real CLI: real processes, signals and a private redis-server.

Every test starts `python -m workerpool.cli --config INI ...` (foreground, or daemonized),
counts tasks by id in the Redis lists the sample handlers write (`test:done`,
`test:started`), and kills every process it started, by pid, at the end.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ProcessReaper, alive, children, wait_for
from redis_server import free_port

TESTS = str(Path(__file__).resolve().parent)
PROJECT = str(Path(TESTS).parent)
QUEUE = "async_tasks"
PREFIX = "{" + QUEUE + "}"


# --- helpers


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would change the pool's behaviour."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WORKERPOOL_")
           and name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = TESTS
    env.update(extra)
    return env


def cli_args(ini: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "workerpool.cli", "--config", ini, *args]


def run_cli(ini: str, *args: str, timeout: float = 30, stdin_text: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    kwargs: dict = {"input": stdin_text} if stdin_text is not None else {
        "stdin": subprocess.DEVNULL}
    return subprocess.run(cli_args(ini, *args), capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(), cwd=PROJECT, **kwargs)


def write_ini(path: Path, settings: dict[str, object]) -> str:
    lines = ["[workerpool]", *(f"{key} = {value}" for key, value in settings.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def status_file(pidfile: str) -> str:
    return pidfile[: -len(".pid")] + ".status.json" if pidfile.endswith(".pid") else (
        pidfile + ".status.json")


def read_status(pidfile: str) -> dict:
    try:
        with open(status_file(pidfile), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _log_time(text: str) -> float:
    """Seconds of a log line's `%(asctime)s` (date, then H:M:S,ms)."""
    clock = text.split()[1]
    hours, minutes, rest = clock.split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def voluntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def tasks_jsonl(ids: list[str], task_type: str = "t", **data: object) -> str:
    return "".join(json.dumps({"type": task_type, "id": task_id, "data": data}) + "\n"
                   for task_id in ids)


def enqueue(ini: str, ids: list[str], task_type: str = "t", **data: object) -> None:
    """Queue tasks through `workerpool enqueue --file -` (JSON lines on stdin)."""
    result = run_cli(ini, "enqueue", "--file", "-", "--quiet",
                     stdin_text=tasks_jsonl(ids, task_type, **data))
    assert result.returncode == 0, result.stderr


def ids_of(redis_client, key: str) -> list[str]:
    return [item.decode() for item in redis_client.lrange(key, 0, -1)]


def processing_keys(redis_client, host: str = "*") -> list[bytes]:
    return list(redis_client.scan_iter(match=f"{PREFIX}:processing:{host}:*", count=1000))


def depths(redis_client) -> dict[str, int]:
    return {
        "pending": redis_client.llen(QUEUE),
        "processing": sum(redis_client.llen(key) for key in processing_keys(redis_client)),
        "retry": redis_client.zcard(f"{PREFIX}:retry"),
        "dead": redis_client.llen(f"{PREFIX}:dead"),
    }


class Pool:
    """A `workerpool start --foreground` process, its log in a file (never an unread pipe)."""

    def __init__(self, process: subprocess.Popen, log_path: Path, reaper: ProcessReaper,
                 pidfile: str) -> None:
        self.process = process
        self.pid = process.pid
        self.log_path = log_path
        self.reaper = reaper
        self.pidfile = pidfile

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def workers(self) -> set[int]:
        """The live worker pids now (each registered with the reaper)."""
        pids = children(self.pid)
        for pid in pids:
            self.reaper.add(pid)
        return pids

    def status(self) -> dict:
        status = read_status(self.pidfile)
        for worker in status.get("workers", []):
            self.reaper.add(worker["pid"])
        return status

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pool still running after {timeout}s; log:\n"
                                 + self.log()[-4000:]) from None


@pytest.fixture
def pool_ini(tmp_path: Path, redis_url: str) -> Callable[..., str]:
    """Write an INI for a pool on the test's Redis; keyword arguments override the defaults."""

    def make(name: str = "workerpool", **settings: object) -> str:
        values: dict[str, object] = {
            "redis_url": redis_url,
            "redis_key": QUEUE,
            "handler": "sample_handlers:record",
            "pidfile": tmp_path / f"{name}.pid",
            "host_id": f"host-{name}",
            "workers": 2,
            "concurrency": 5,
            "interval": 0.2,
            "drain_timeout": 5,
            "worker_timeout": 5,
            "crash_limit": 20,
            "crash_window": 60,
            "retry_backoff": 0.1,
        }
        values.update(settings)
        return write_ini(tmp_path / f"{name}.ini", values)

    return make


@pytest.fixture
def start_pool(tmp_path: Path, reaper: ProcessReaper) -> Iterator[Callable[..., Pool]]:
    """Start `workerpool start --foreground`; every supervisor and worker is killed at the end."""
    pools: list[Pool] = []

    def start(ini: str, *args: str, env: dict[str, str] | None = None,
              new_session: bool = False, name: str = "pool",
              argv: list[str] | None = None) -> Pool:
        """`argv` replaces the command (e.g. a snippet running a Supervisor with hooks)."""
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                argv or cli_args(ini, "start", "--foreground", *args),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=env or cli_env(), cwd=PROJECT, start_new_session=new_session,
            )
        reaper.add(process.pid)
        pidfile = re.search(r"^pidfile = (.*)$", Path(ini).read_text(), re.M).group(1)
        pool = Pool(process, log_path, reaper, pidfile)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.workers()  # register the last workers too: the reaper kills them by pid
        pool.status()
    reaper.kill_all()
    for pool in pools:
        try:
            pool.process.wait(5)
        except subprocess.TimeoutExpired:
            pass


def wait_running(pool: Pool, workers: int, timeout: float = 15) -> dict:
    """Wait until the status file shows `workers` workers, all past starting."""

    def ready() -> dict | None:
        if pool.process.poll() is not None:
            raise AssertionError(f"pool exited with {pool.process.returncode}:\n{pool.log()}")
        status = pool.status()
        states = [w["state"] for w in status.get("workers", [])]
        return status if len(states) == workers and "starting" not in states else None

    return wait_for(ready, timeout)


# --- 1. daemon: start, status, stop, already running, stale pidfile


def test_daemon_start_status_stop(pool_ini, redis_client, reaper, tmp_path):
    log_file = tmp_path / "logs" / "pool.log"
    pidfile = str(tmp_path / "run" / "pool.pid")
    ini = pool_ini(pidfile=pidfile, log_file=log_file)

    started = run_cli(ini, "start", timeout=20)
    assert started.returncode == 0, started.stderr
    assert "in the background" in started.stdout
    pid = int(wait_for(lambda: Path(pidfile).exists() and Path(pidfile).read_text().strip(), 10))
    reaper.add(pid)
    assert alive(pid)

    def status_json() -> dict | None:
        result = run_cli(ini, "status", "--json", timeout=15)
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        workers = (report.get("supervisor") or {}).get("workers", [])
        for worker in workers:
            reaper.add(worker["pid"])
        states = {w["state"] for w in workers}
        return report if len(workers) == 2 and states <= {"idle", "busy"} else None

    report = wait_for(status_json, 15, step=0.2)
    assert report["state"] == "running" and report["pid"] == pid
    worker_pids = {w["pid"] for w in report["supervisor"]["workers"]}
    assert len(worker_pids) == 2 and all(alive(w) for w in worker_pids)
    assert worker_pids == children(pid)
    assert set(report["queue"]) >= {"pending", "processing", "retry", "dead"}

    ids = [f"d{i}" for i in range(50)]
    enqueue(ini, ids)
    wait_for(lambda: len(ids_of(redis_client, "test:done")) >= 50, 15)
    assert sorted(ids_of(redis_client, "test:done")) == sorted(ids)

    text = run_cli(ini, "status", timeout=15)
    assert text.returncode == 0
    assert f"workerpool is running (pid {pid})" in text.stdout
    for worker_pid in worker_pids:
        assert str(worker_pid) in text.stdout
    assert "pending 0, processing 0, retry 0, dead 0" in text.stdout
    report = json.loads(run_cli(ini, "status", "--json", timeout=15).stdout)
    assert report["queue"] == {"pending": 0, "processing": 0, "retry": 0, "dead": 0}

    again = run_cli(ini, "start", timeout=20)
    assert again.returncode == 0, again.stderr
    assert f"already running (pid {pid})" in again.stdout
    assert alive(pid) and int(Path(pidfile).read_text()) == pid

    stopped = run_cli(ini, "stop", "--timeout", "20", timeout=40)
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(pid)
    assert not any(alive(w) for w in worker_pids)
    assert not Path(pidfile).exists()
    gone = run_cli(ini, "status", timeout=15)
    assert gone.returncode == 3, gone.stdout
    assert "not running" in gone.stdout

    log = log_file.read_text()
    assert f"starting workerpool supervisor (pid {pid})" in log
    assert "SIGTERM received: draining" in log
    assert "workerpool stopped (SIGTERM received); 50 task(s) finished" in log


def test_daemon_start_fails_visibly_when_the_log_file_cannot_be_written(pool_ini, tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    log_file = tmp_path / "not-a-dir" / "pool.log"
    ini = pool_ini(log_file=log_file)
    result = run_cli(ini, "start", timeout=20)
    # Said before detaching, where the operator sees it: the daemon's stderr is /dev/null.
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot write {log_file.parent}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "in the background" not in result.stdout
    assert not (tmp_path / "workerpool.pid").exists()
    assert run_cli(ini, "status", timeout=15).returncode == 3


def test_stale_pidfile(pool_ini, redis_client, start_pool, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    pidfile = tmp_path / "stale.pid"
    pidfile.write_text(f"{dead.pid}\n")
    ini = pool_ini(pidfile=pidfile)

    result = run_cli(ini, "status", timeout=15)
    assert result.returncode == 1, result.stdout
    assert f"dead but its pidfile is left (pid {dead.pid})" in result.stdout
    report = json.loads(run_cli(ini, "status", "--json", timeout=15).stdout)
    assert report["state"] == "dead" and report["pid"] == dead.pid

    # A stale pidfile does not stop a start.
    enqueue(ini, ["s1"])
    pool = start_pool(ini, "--max-tasks", "1")
    assert pool.wait(20) == 0, pool.log()
    assert ids_of(redis_client, "test:done") == ["s1"]
    assert run_cli(ini, "status", timeout=15).returncode == 3


# --- 2. exact max_tasks


def test_max_tasks_exact_with_4_workers(pool_ini, redis_client, start_pool):
    ini = pool_ini(log_level="warning")
    ids = [f"m{i:04d}" for i in range(1000)]
    enqueue(ini, ids)
    pool = start_pool(ini, "--workers", "4", "--concurrency", "10", "--max-tasks", "500")
    assert pool.wait(60) == 0, pool.log()
    done = ids_of(redis_client, "test:done")
    assert len(done) == 500
    assert len(set(done)) == 500
    # FIFO and never more than 500 taken: exactly the 500 oldest ran, the 500 newest wait.
    assert set(done) == set(ids[:500])
    pending = [json.loads(raw)["id"] for raw in redis_client.lrange(QUEUE, 0, -1)]
    assert sorted(pending) == ids[500:]
    assert depths(redis_client) == {"pending": 500, "processing": 0, "retry": 0, "dead": 0}
    assert processing_keys(redis_client) == []


def test_max_tasks_exact_when_a_worker_dies_after_its_results_were_written(
        pool_ini, redis_client, start_pool, tmp_path):
    # The worker dies between Redis applying its results and counting them: the supervisor
    # must count them from Redis, else it hands their slots out again (21 would finish).
    ini = pool_ini(handler="sample_handlers:record_then_die_after_settle", log_level="info")
    ids = [f"s{i:02d}" for i in range(40)]
    enqueue(ini, ids, marker=str(tmp_path / "died"))
    pool = start_pool(ini, "--workers", "2", "--concurrency", "1", "--max-tasks", "20")
    assert pool.wait(60) == 0, pool.log()
    assert "died after its last 1 result(s) were written: counted" in pool.log()
    # A task the dying worker had started meanwhile ran again elsewhere (at least once).
    assert set(ids_of(redis_client, "test:done")) == set(ids[:20])
    assert depths(redis_client) == {"pending": 20, "processing": 0, "retry": 0, "dead": 0}


# --- 3. kill -9 of random workers under load


@pytest.mark.slow
def test_kill_9_random_workers_under_load_loses_nothing(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:jitter", workers=4, concurrency=1,
                   crash_limit=1000, max_deliveries=1000, log_level="warning")
    ids = [f"k{i:04d}" for i in range(3000)]
    enqueue(ini, ids)
    pool = start_pool(ini)
    wait_running(pool, 4)
    kills = 0
    kills_under_load = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if redis_client.llen(QUEUE) == 0:
            break
        workers = sorted(pool.workers())
        if workers:
            victim = random.choice(workers)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills += 1
            if redis_client.llen(QUEUE) > 0:
                kills_under_load += 1
    assert kills_under_load >= 5, (kills, kills_under_load)

    def finished() -> bool:
        pool.workers()
        return depths(redis_client) == {"pending": 0, "processing": 0, "retry": 0, "dead": 0}

    wait_for(finished, 60, step=0.1)
    done = ids_of(redis_client, "test:done")
    assert set(done) == set(ids), f"missing: {sorted(set(ids) - set(done))[:10]}"
    assert pool.process.poll() is None, pool.log()
    assert pool.log().count("was killed by SIGKILL") >= kills_under_load
    wait_running(pool, 4, timeout=20)  # every killed worker was replaced

    stopped = run_cli(ini, "stop", "--timeout", "20", timeout=40)
    assert stopped.returncode == 0, stopped.stderr
    assert pool.wait(10) == 0


# --- 4. kill -9 of the supervisor, then another host takes over


@pytest.mark.slow
def test_kill_9_supervisor_workers_exit_and_another_host_takes_over(
        pool_ini, redis_client, start_pool):
    ini_a = pool_ini("a", handler="sample_handlers:slow", workers=2, concurrency=3,
                     host_timeout=2)
    ids = [f"h{i:02d}" for i in range(12)]
    enqueue(ini_a, ids, "slow", seconds=3)
    host_a = start_pool(ini_a, name="a")
    wait_for(lambda: len(ids_of(redis_client, "test:started")) >= 6, 15)
    workers = sorted(host_a.workers())
    assert len(workers) == 2
    os.kill(host_a.pid, signal.SIGKILL)
    host_a.wait(5)
    # Host death, with one worker going down with it: its tasks stay in its processing list.
    victim, survivor = workers
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    # The survivor notices its supervisor is gone, finishes its tasks and exits on its own.
    wait_for(lambda: not alive(survivor), 8)
    assert time.monotonic() - killed_at < 8
    assert len(ids_of(redis_client, "test:done")) == 3
    left = processing_keys(redis_client, "host-a")
    assert len(left) == 1 and left[0].endswith(f"-{victim}".encode())
    orphans = sorted(json.loads(raw)["id"] for raw in redis_client.lrange(left[0], 0, -1))
    assert len(orphans) == 3 and not set(orphans) & set(ids_of(redis_client, "test:done"))
    assert redis_client.llen(QUEUE) == 6

    ini_b = pool_ini("b", handler="sample_handlers:slow", workers=3, concurrency=3,
                     host_timeout=2)
    host_b = start_pool(ini_b, name="b")
    wait_for(lambda: len(ids_of(redis_client, "test:done")) == 12, 25)
    assert sorted(ids_of(redis_client, "test:done")) == ids  # each exactly once
    assert "host host-a silent for over 2s: requeued 3 of its task(s)" in host_b.log()
    assert processing_keys(redis_client, "host-a") == []
    started = collections.Counter(ids_of(redis_client, "test:started"))
    assert sorted(i for i, n in started.items() if n == 2) == orphans
    assert sorted(started) == ids and sum(started.values()) == 15
    os.kill(host_b.pid, signal.SIGTERM)
    assert host_b.wait(15) == 0, host_b.log()
    assert depths(redis_client) == {"pending": 0, "processing": 0, "retry": 0, "dead": 0}


# --- 5. TERM while slow tasks run


def test_term_finishes_in_flight_and_takes_nothing_more(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:slow", workers=2, concurrency=3, drain_timeout=10)
    ids = [f"t{i:02d}" for i in range(20)]
    enqueue(ini, ids, "slow", seconds=1.5)
    pool = start_pool(ini)
    wait_for(lambda: len(ids_of(redis_client, "test:started")) == 6
             and redis_client.llen(QUEUE) == 14, 15)
    pool.workers()
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0, pool.log()
    started = ids_of(redis_client, "test:started")
    done = ids_of(redis_client, "test:done")
    assert len(started) == 6
    assert sorted(done) == sorted(started)  # every in-flight task finished
    assert set(started) == set(ids[:6])
    assert redis_client.llen(QUEUE) == 14  # nothing taken after TERM
    assert [json.loads(raw)["id"] for raw in reversed(redis_client.lrange(QUEUE, 0, -1))] == (
        ids[6:])
    assert processing_keys(redis_client) == []
    log = pool.log()
    assert "SIGTERM received: draining 2 worker(s), 6 task(s) in flight" in log


# --- 6. crash loop


def test_crash_loop_exits_1(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:crash", workers=2, crash_limit=3, crash_window=30,
                   max_deliveries=100)
    ids = [f"c{i:02d}" for i in range(20)]
    enqueue(ini, ids, crash=True)
    pool = start_pool(ini)
    assert pool.wait(30) == 1
    log = pool.log()
    assert "crash loop" in log
    assert "crash_limit 3" in log
    # crash_limit deaths stop the pool: the third, not a fourth (the workers killed on the
    # way out come after the message).
    before_stop = log[: log.index("crash loop")]
    deaths = re.findall(r"supervisor: worker \d+ \(pid \d+\) (?:exited|was killed)", before_stop)
    assert len(deaths) == 3, before_stop
    assert "crash loop: 3 worker deaths within crash_window 30s (crash_limit 3): stopping " \
        "the pool" in log
    # Nothing lost on the way out: every task is back in the queue.
    assert depths(redis_client) == {"pending": 20, "processing": 0, "retry": 0, "dead": 0}
    assert processing_keys(redis_client) == []
    assert ids_of(redis_client, "test:done") == []


# --- 7. a worker blocking its event loop


@pytest.mark.slow
def test_blocking_handler_is_killed_and_replaced(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:block_loop", workers=2, worker_timeout=2,
                   max_deliveries=1)
    pool = start_pool(ini)
    before = wait_running(pool, 2)
    enqueue(ini, ["blocker"], block=True)
    wait_for(lambda: "blocker" in ids_of(redis_client, "test:started"), 10)
    others = [f"b{i:02d}" for i in range(30)]
    enqueue(ini, others)
    # The other worker keeps going while one is stuck.
    wait_for(lambda: len(ids_of(redis_client, "test:done")) == 30, 10)
    match = wait_for(lambda: re.search(
        r"worker \d+ \(pid (\d+)\) silent for [\d.]+s \(worker_timeout 2s\)", pool.log()), 10)
    hung = int(match.group(1))
    assert hung in {w["pid"] for w in before["workers"]}
    wait_for(lambda: not alive(hung), 5)

    def replaced() -> set[int] | None:
        status = wait_running(pool, 2)
        pids = {w["pid"] for w in status["workers"]}
        return pids if hung not in pids else None

    pids = wait_for(replaced, 10)
    assert len(pids) == 2 and pids == pool.workers()
    dead = [json.loads(raw) for raw in redis_client.lrange(f"{PREFIX}:dead", 0, -1)]
    assert len(dead) == 1 and dead[0]["reason"] == "max_deliveries"
    assert json.loads(dead[0]["task"])["id"] == "blocker"
    more = [f"a{i:02d}" for i in range(30)]
    enqueue(ini, more)
    wait_for(lambda: len(ids_of(redis_client, "test:done")) == 60, 10)
    assert sorted(ids_of(redis_client, "test:done")) == sorted(others + more)
    assert pool.process.poll() is None
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


# --- 8. poison pill


def test_poison_pill_is_dead_lettered_after_max_deliveries(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:crash", workers=2, concurrency=1, max_deliveries=3)
    ids = [f"p{i:02d}" for i in range(20)]
    enqueue(ini, ["poison"], crash=True)
    enqueue(ini, ids)
    pool = start_pool(ini)
    wait_for(lambda: redis_client.llen(f"{PREFIX}:dead") == 1
             and set(ids_of(redis_client, "test:done")) == set(ids), 20)
    entry = json.loads(redis_client.lindex(f"{PREFIX}:dead", 0))
    assert entry["reason"] == "max_deliveries"
    assert entry["attempts"] == 3
    assert json.loads(entry["task"])["id"] == "poison"
    assert ids_of(redis_client, "test:started").count("poison") == 3
    # At least once: a task whose result was not yet written when the poison killed its
    # worker runs again; nothing else is lost or dead-lettered.
    assert set(ids_of(redis_client, "test:done")) == set(ids)
    wait_for(lambda: depths(redis_client) == {"pending": 0, "processing": 0, "retry": 0,
                                              "dead": 1}, 5)
    assert pool.process.poll() is None
    # Each crashed worker was restarted in its own slot after its backoff, not at once in
    # another slot (so the pool keeps its worker names 1 and 2).
    wait_for(lambda: len(re.findall(r"supervisor: worker \d+ started", pool.log())) == 2
             + pool.log().count("was killed by SIGKILL"), 5)
    log = pool.log()
    assert set(re.findall(r"worker (\d+) started", log)) == {"1", "2"}
    events = [(_log_time(m.group(1)), m.group(2), m.group(3), m.group(4)) for m in re.finditer(
        r"^(\S+ \S+) \w+ supervisor: (?:restarting worker (\d+) in ([\d.]+)s"
        r"|worker (\d+) started)", log, re.M)]
    restarts = 0
    for i, (when, name, backoff, _) in enumerate(events):
        if name is None:
            continue
        started = next(e[0] for e in events[i + 1:] if e[3] == name)
        assert started - when >= float(backoff) - 0.002, (name, backoff, log)
        restarts += 1
    assert restarts >= 3  # one per poison death
    # An idle supervisor sleeps until its next tick: no busy loop left behind by the backoffs.
    wait_running(pool, 2)
    switches = voluntary_switches(pool.pid)
    time.sleep(2)
    assert voluntary_switches(pool.pid) - switches < 80
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


def test_poison_pill_does_not_take_its_batch_down(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:crash", workers=1, concurrency=5, max_deliveries=3)
    innocent = [f"n{i}" for i in range(4)]
    enqueue(ini, ["poison"], crash=True)
    enqueue(ini, innocent)
    pool = start_pool(ini)
    wait_for(lambda: redis_client.llen(f"{PREFIX}:dead") >= 1
             and depths(redis_client)["pending"] == 0
             and depths(redis_client)["processing"] == 0, 20)
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0
    dead = [json.loads(json.loads(raw)["task"])["id"]
            for raw in redis_client.lrange(f"{PREFIX}:dead", 0, -1)]
    assert dead == ["poison"]
    assert sorted(ids_of(redis_client, "test:done")) == innocent


# --- 9. HUP under load


@pytest.mark.slow
def test_reload_under_load_replaces_workers_and_loses_nothing(pool_ini, redis_client,
                                                              start_pool):
    ini = pool_ini(handler="sample_handlers:slow", workers=2, concurrency=5, log_level="warning")
    ids = [f"r{i:04d}" for i in range(1000)]
    enqueue(ini, ids, "slow", seconds=0.02)
    pool = start_pool(ini)
    old = {w["pid"] for w in wait_running(pool, 2)["workers"]}
    wait_for(lambda: len(ids_of(redis_client, "test:done")) >= 100, 15)
    pool_ini(handler="sample_handlers:slow", workers=2, concurrency=3, log_level="warning")
    reload = run_cli(ini, "reload", timeout=15)
    assert reload.returncode == 0, reload.stderr
    assert f"reload requested (pid {pool.pid})" in reload.stdout
    assert redis_client.llen(QUEUE) > 0  # under load

    def replaced() -> dict | None:
        status = pool.status()
        pids = {w["pid"] for w in status.get("workers", [])}
        ok = status.get("concurrency") == 3 and len(pids) == 2 and not pids & old
        return status if ok and {w["state"] for w in status["workers"]} <= {"idle", "busy"} else (
            None)

    new = {w["pid"] for w in wait_for(replaced, 20)["workers"]}
    assert not new & old
    wait_for(lambda: depths(redis_client) == {"pending": 0, "processing": 0, "retry": 0,
                                              "dead": 0}, 30)
    done = ids_of(redis_client, "test:done")
    assert sorted(done) == ids  # every task exactly once
    assert not any(alive(pid) for pid in old)
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


# --- 10. TTIN / TTOU


def test_ttin_ttou_change_the_worker_count(pool_ini, redis_client, start_pool):
    ini = pool_ini(workers=2)
    pool = start_pool(ini)
    wait_running(pool, 2)

    def status_workers() -> tuple[int, int]:
        result = run_cli(ini, "status", "--json", timeout=15)
        assert result.returncode == 0
        supervisor = json.loads(result.stdout)["supervisor"] or {}
        return (supervisor.get("target_workers"), len(supervisor.get("workers", [])))

    os.kill(pool.pid, signal.SIGTTIN)
    wait_running(pool, 3)
    wait_for(lambda: status_workers() == (3, 3), 10, step=0.2)
    for _ in range(3):  # the third TTOU is refused: the last worker stays
        os.kill(pool.pid, signal.SIGTTOU)
        time.sleep(0.1)
    wait_running(pool, 1)
    wait_for(lambda: status_workers() == (1, 1), 10, step=0.2)
    assert len(pool.workers()) == 1
    assert "SIGTTOU ignored: keeping the last worker" in pool.log()
    enqueue(ini, ["x1", "x2"])
    wait_for(lambda: sorted(ids_of(redis_client, "test:done")) == ["x1", "x2"], 10)
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


# --- 11. sd_notify


def test_sd_notify_ready_status_stopping(pool_ini, start_pool, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        pool = start_pool(pool_ini(), env=cli_env(NOTIFY_SOCKET=path))
        messages: list[str] = []

        def receive_until(wanted: str, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    continue
                if any(wanted in message.split("\n") for message in messages):
                    return
            raise AssertionError(f"no {wanted} within {timeout}s: {messages}")

        receive_until("READY=1", 15)
        ready = next(m for m in messages if "READY=1" in m.split("\n"))
        assert "STATUS=2 workers" in ready
        receive_until("STATUS=2 workers, 0 in flight, done=0", 5)
        assert not any("STOPPING=1" in m for m in messages)
        pool.workers()
        os.kill(pool.pid, signal.SIGTERM)
        receive_until("STOPPING=1", 10)
        assert pool.wait(15) == 0
    finally:
        sock.close()
    lines = [line for m in messages for line in m.split("\n")]
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert all(line.split("=")[0] in ("READY", "STATUS", "STOPPING") for line in lines)


# --- 12. Ctrl+C in a terminal reaches the whole process group


def test_ctrl_c_to_the_process_group_drains_once(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:slow", workers=2, concurrency=2, drain_timeout=10)
    ids = [f"i{i:02d}" for i in range(10)]
    enqueue(ini, ids, "slow", seconds=1.5)
    pool = start_pool(ini, new_session=True)
    wait_for(lambda: len(ids_of(redis_client, "test:started")) == 4
             and redis_client.llen(QUEUE) == 6, 15)
    workers = pool.workers()
    assert len(workers) == 2 and all(os.getpgid(w) == pool.pid for w in workers)
    os.killpg(pool.pid, signal.SIGINT)
    assert pool.wait(15) == 0, pool.log()
    started = ids_of(redis_client, "test:started")
    assert sorted(started) == sorted(ids[:4])  # each once: nothing was requeued and rerun
    assert sorted(ids_of(redis_client, "test:done")) == sorted(ids[:4])
    assert redis_client.llen(QUEUE) == 6
    assert processing_keys(redis_client) == []
    log = pool.log().splitlines()
    draining = [line for line in log if " supervisor: " in line and "draining" in line]
    assert len(draining) == 1, draining
    assert "SIGINT received: draining 2 worker(s), 4 task(s) in flight" in draining[0]
    assert not [line for line in log if "stopping now" in line or "requeued" in line]
    # The workers ignored the INT: they drained on the supervisor's TERM, and exited cleanly.
    worker_drains = [line for line in log if re.search(r" worker \d+: draining", line)]
    assert len(worker_drains) == 2 and all("(SIGTERM)" in line for line in worker_drains)
    assert sum("exited with code 0" in line for line in log) == 2


# --- 13. recycling


def test_workers_are_recycled_after_max_tasks_per_worker(pool_ini, redis_client, start_pool):
    ini = pool_ini(handler="sample_handlers:jitter", workers=2, concurrency=2,
                   max_tasks_per_worker=20)
    ids = [f"w{i:03d}" for i in range(200)]
    enqueue(ini, ids)
    pool = start_pool(ini)
    wait_for(lambda: depths(redis_client) == {"pending": 0, "processing": 0, "retry": 0,
                                              "dead": 0}
             and len(ids_of(redis_client, "test:done")) >= 200, 30, step=0.1)
    done = ids_of(redis_client, "test:done")
    assert sorted(done) == ids  # each exactly once
    log = pool.log()
    pids = set(re.findall(r"worker \d+ started \(pid (\d+)\)", log))
    # 200 tasks, 20-22 per worker: at least 9 workers lived, and no more than the tasks need.
    assert 9 <= len(pids) <= 13, len(pids)
    assert log.count("recycling after") >= 8
    assert "was killed" not in log and "requeued" not in log
    # The pool's count survives its workers: recycled workers' tasks still count.
    wait_for(lambda: wait_running(pool, 2).get("processed") == 200, 5)
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0
    assert "workerpool stopped (SIGTERM received); 200 task(s) finished" in pool.log()


# --- 14. Redis unreachable at start


def test_redis_unreachable_at_start_exits_1_with_masked_url(pool_ini, tmp_path, reaper):
    port = free_port()
    ini = pool_ini()
    result = run_cli(ini, "start", "--foreground", "--redis-url",
                     f"redis://:secret@127.0.0.1:{port}", timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"redis://:***@127.0.0.1:{port}" in output
    assert "secret" not in output
    assert not (tmp_path / "workerpool.pid").exists()


# --- operations: log rotation, bad reload, process titles, memory recycling


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode().strip()


def test_log_file_is_reopened_after_rotation(pool_ini, redis_client, reaper, tmp_path):
    log_file = tmp_path / "pool.log"
    ini = pool_ini(log_file=log_file, workers=1)
    pidfile = tmp_path / "workerpool.pid"
    started = run_cli(ini, "start")
    assert started.returncode == 0, started.stderr
    # The daemon writes its pidfile once detached, a moment after `start` returns.
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip()))
    reaper.add(pid)
    try:
        enqueue(ini, ["before"])
        wait_for(lambda: "task done" in log_file.read_text())
        log_file.rename(tmp_path / "pool.log.1")  # what logrotate does (no copytruncate)
        enqueue(ini, ["after"])
        wait_for(lambda: log_file.exists() and "'after'" in log_file.read_text())
        assert "'after'" not in (tmp_path / "pool.log.1").read_text()
    finally:
        for worker in children(pid):
            reaper.add(worker)
        assert run_cli(ini, "stop").returncode == 0
    assert "workerpool stopped" in log_file.read_text()  # the supervisor reopened it too


def test_reload_with_a_bad_config_keeps_the_old_one(pool_ini, redis_client, start_pool):
    ini = pool_ini(workers=1)
    pool = start_pool(ini)
    before = {w["pid"] for w in wait_running(pool, 1)["workers"]}
    Path(ini).write_text(Path(ini).read_text().replace("concurrency = 5", "concurrency = lots"))
    os.kill(pool.pid, signal.SIGHUP)
    wait_for(lambda: "config not reloaded, keeping the old one" in pool.log())
    assert "concurrency = 'lots'" in pool.log()
    from workerpool.protocol import SyncQueue, new_task

    SyncQueue(redis_client, QUEUE).enqueue(new_task("t", {}, id="still-working"))
    wait_for(lambda: ids_of(redis_client, "test:done") == ["still-working"])
    assert {w["pid"] for w in pool.status()["workers"]} == before  # nobody replaced
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


def test_process_titles_name_the_queue_and_state(pool_ini, start_pool):
    pool = start_pool(pool_ini(workers=2, concurrency=7))
    status = wait_running(pool, 2)
    wait_for(lambda: "workers" in _cmdline(pool.pid))
    assert _cmdline(pool.pid).startswith(f"workerpool: supervisor [{QUEUE}] 2 workers")
    for worker in status["workers"]:
        title = wait_for(lambda pid=worker["pid"]: "worker" in _cmdline(pid) and _cmdline(pid))
        assert re.match(rf"workerpool: worker {worker['worker']} \[{QUEUE}\] idle 0/7 done=0",
                        title), title
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


def test_worker_over_its_memory_limit_is_replaced_without_losing_tasks(
        pool_ini, redis_client, start_pool):
    # 1 MiB is below any Python process: every worker recycles once it has done some work.
    ini = pool_ini(workers=1, concurrency=1, max_memory_per_worker=1,
                   handler="sample_handlers:slow")
    ids = [f"m{i:02d}" for i in range(50)]  # 2.5 s of work: past a housekeeping round
    enqueue(ini, ids, "slow", seconds=0.05)
    pool = start_pool(ini)
    wait_for(lambda: sorted(set(ids_of(redis_client, "test:done"))) == ids, 30)
    assert "recycling: memory above 1 MiB" in pool.log()
    assert len(re.findall(r"supervisor: worker \d+ started", pool.log())) >= 2
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0
    assert depths(redis_client) == {"pending": 0, "processing": 0, "retry": 0, "dead": 0}


def test_reload_refuses_to_move_a_running_pool_to_another_queue(pool_ini, redis_client,
                                                                start_pool):
    ini = pool_ini(workers=1)
    pool = start_pool(ini)
    before = {w["pid"] for w in wait_running(pool, 1)["workers"]}
    Path(ini).write_text(Path(ini).read_text().replace(f"redis_key = {QUEUE}",
                                                       "redis_key = elsewhere"))
    os.kill(pool.pid, signal.SIGHUP)
    wait_for(lambda: "redis_key cannot change while running" in pool.log())
    assert {w["pid"] for w in pool.status()["workers"]} == before
    assert pool.status()["redis_key"] == QUEUE
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


# --- the reviewer's defects: Redis hanging, startup stops, slots, reloads, orphans, reaper

SUPERVISOR_SNIPPET = """
import os, sys, time
from workerpool.config import load_config, load_handler
from workerpool.daemon import status_path
from workerpool.logs import setup_logging
from workerpool.supervisor import Supervisor

ini, after_fork_delay, parent_fork_delay = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if parent_fork_delay:
    real_fork = os.fork

    def fork_then_pause_the_parent():
        pid = real_fork()
        if pid:
            time.sleep(parent_fork_delay)  # the child runs ahead of the parent's bookkeeping
        return pid

    os.fork = fork_then_pause_the_parent
config = load_config(ini)
setup_logging(config.log_level)
supervisor = Supervisor(config, load_handler(config), reload_config=lambda: load_config(ini),
                        status_file=status_path(config.pidfile),
                        after_fork=(lambda: time.sleep(after_fork_delay))
                        if after_fork_delay else None)
sys.exit(supervisor.run())
"""


def supervisor_argv(ini: str, *, after_fork_delay: float = 0.0,
                    parent_fork_delay: float = 0.0) -> list[str]:
    """A Supervisor run directly, with a slow after_fork (like django.setup()) or a parent
    that pauses after each fork."""
    return [sys.executable, "-c", SUPERVISOR_SNIPPET, ini, str(after_fork_delay),
            str(parent_fork_delay)]


def test_redis_hanging_does_not_freeze_the_supervisor_loop(pool_ini, make_redis_server,
                                                           start_pool, tmp_path):
    server = make_redis_server()
    ini = pool_ini(redis_url=server.url, workers=3, drain_timeout=2)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    pings: list[float] = []

    def receive(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if "WATCHDOG=1" in sock.recv(4096).decode().split("\n"):
                    pings.append(time.monotonic())
            except TimeoutError:
                pass

    stopped = False
    try:
        pool = start_pool(ini, env=cli_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="30000000"))
        workers = {w["pid"] for w in wait_running(pool, 3)["workers"]}
        receive(1.0)
        os.kill(server.process.pid, signal.SIGSTOP)
        stopped = True
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        receive(5.0)  # three requeues fail: one try a tick, replacements start meanwhile
        pool.workers()
        os.kill(pool.pid, signal.SIGTERM)
        term_sent = time.monotonic()
        # Without a cap per tick, three requeues of 10 s each held TERM back ~30 s.
        while "SIGTERM received: draining" not in pool.log():
            assert time.monotonic() - term_sent < 7, pool.log()  # headroom for a busy CI
            receive(0.1)
        receive(2.0)
        gaps = [later - earlier for earlier, later in zip(pings, pings[1:], strict=False)]
        # systemd's WatchdogSec=30 would abort a loop silent for half of that; 10 s of a dead
        # Redis see a ping every tick of at most one 2 s timeout (plus forks on a busy CI).
        assert len(pings) >= 4 and max(gaps) < 7, (gaps, pool.log())
        pool.workers()
        os.kill(server.process.pid, signal.SIGCONT)
        stopped = False
        assert pool.wait(30) == 0, pool.log()
    finally:
        if stopped:
            os.kill(server.process.pid, signal.SIGCONT)
        sock.close()
    log = pool.log()
    assert "redis unavailable while requeueing worker" in log
    assert "redis unavailable: requeueing worker" in log  # the others deferred, not tried


def test_reload_to_fewer_workers_never_spawns_then_stops_one(pool_ini, start_pool):
    ini = pool_ini(workers=3)
    pool = start_pool(ini, argv=supervisor_argv(ini, after_fork_delay=1.0))
    old = {w["pid"] for w in wait_running(pool, 3, timeout=20)["workers"]}
    pool_ini(workers=1)
    os.kill(pool.pid, signal.SIGHUP)

    def replaced() -> bool:
        pids = {w["pid"] for w in wait_running(pool, 1, timeout=20)["workers"]}
        return not pids & old and not any(alive(pid) for pid in old)

    wait_for(replaced, 20)
    log = pool.log()
    assert "killed by SIGTERM" not in log and "restarting worker" not in log, log
    assert " ERROR " not in log, log
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0, pool.log()


def test_worker_stopped_while_starting_up_is_not_a_crash(pool_ini, start_pool):
    # crash_limit 1: a single death counted as a crash would stop the pool.
    ini = pool_ini(workers=1, crash_limit=1)
    pool = start_pool(ini, argv=supervisor_argv(ini, after_fork_delay=3.0))
    wait_running(pool, 1, timeout=20)
    os.kill(pool.pid, signal.SIGTTIN)
    match = wait_for(lambda: re.search(r"worker 2 started \(pid (\d+)\)", pool.log()), 10)
    starting = int(match.group(1))
    pool.reaper.add(starting)
    os.kill(pool.pid, signal.SIGTTOU)  # worker 2 is still in its 3 s after_fork
    wait_for(lambda: "stopped while starting up" in pool.log(), 10)
    assert not alive(starting)
    assert f"worker 2 (pid {starting}) was killed by SIGTERM: stopped while starting up" in (
        pool.log())
    time.sleep(0.5)  # a restart would come after a 0.1 s backoff
    assert pool.process.poll() is None, pool.log()
    assert "restarting worker" not in pool.log() and " ERROR " not in pool.log(), pool.log()

    # A drain that catches a worker starting up is no crash either.
    os.kill(pool.pid, signal.SIGTTIN)
    wait_for(lambda: len(re.findall(r"worker 2 started", pool.log())) == 2, 10)
    pool.workers()
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0, pool.log()
    log = pool.log()
    assert log.count("stopped while starting up") == 2 and " ERROR " not in log, log


def test_slot_claimed_before_the_fork_keeps_the_worker_state(pool_ini, start_pool):
    # The parent pauses after each fork, so the children set themselves idle first: a slot
    # claimed after the fork would be reset to "starting", and READY never sent.
    ini = pool_ini(workers=2)
    pool = start_pool(ini, argv=supervisor_argv(ini, parent_fork_delay=1.5))
    status = wait_running(pool, 2, timeout=20)
    assert {w["state"] for w in status["workers"]} == {"idle"}
    wait_for(lambda: "2 worker(s) running" in pool.log(), 5)
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0, pool.log()


def test_reload_applies_a_new_max_tasks(pool_ini, redis_client, start_pool):
    ini = pool_ini(workers=1, max_tasks=100)
    pool = start_pool(ini)
    old = {w["pid"] for w in wait_running(pool, 1)["workers"]}
    pool_ini(workers=1, max_tasks=3)
    os.kill(pool.pid, signal.SIGHUP)
    wait_for(lambda: not {w["pid"] for w in wait_running(pool, 1)["workers"]} & old, 15)
    assert "SIGHUP: max_tasks now 3" in pool.log()
    assert pool.status()["max_tasks"] == 3
    enqueue(ini, [f"x{i}" for i in range(10)])
    assert pool.wait(20) == 0, pool.log()
    assert len(ids_of(redis_client, "test:done")) == 3
    assert "workerpool stopped (max_tasks reached); 3 task(s) finished of max_tasks 3" in (
        pool.log())


def test_reload_refuses_to_switch_between_unlimited_and_a_max_tasks(pool_ini, start_pool):
    ini = pool_ini(workers=1)
    pool = start_pool(ini)
    before = {w["pid"] for w in wait_running(pool, 1)["workers"]}
    pool_ini(workers=1, max_tasks=5)
    os.kill(pool.pid, signal.SIGHUP)
    wait_for(lambda: "max_tasks (between unlimited and a limit) cannot change" in pool.log())
    assert {w["pid"] for w in pool.status()["workers"]} == before
    assert pool.status()["max_tasks"] == 0
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(15) == 0


def test_more_workers_than_slots_logs_a_warning_once(tmp_path, caplog):
    from workerpool.config import load_config
    from workerpool.scoreboard import Scoreboard
    from workerpool.supervisor import Supervisor, WorkerProcess

    config = load_config(None, search=False, environ={},
                         overrides={"pidfile": str(tmp_path / "wp.pid"), "workers": "2"})
    supervisor = Supervisor(config, handler=lambda task: None)
    supervisor.scoreboard = Scoreboard(2)  # every slot taken by the two workers below
    for slot in range(2):  # pids nobody signals: nothing here scales down or kills
        supervisor.workers[-1 - slot] = WorkerProcess(slot, -1 - slot, time.monotonic())
    supervisor.target = 3  # what a SIGTTIN asks for
    with caplog.at_level("WARNING", logger="workerpool.supervisor"):
        supervisor._manage()
        supervisor._manage()
    warnings = [r.getMessage() for r in caplog.records if "cannot start more than" in
                r.getMessage()]
    assert warnings == ["cannot start more than 2 worker(s) (the scoreboard's slots, sized at "
                        "start from workers): 3 wanted; restart the pool to run more"]
    supervisor._client.close()


def test_orphan_lists_are_those_not_of_our_live_workers(pool_ini, redis_client, start_pool,
                                                        reaper):
    from workerpool.protocol import new_task

    # A process unrelated to the pool holds the pid named in a list of this host (a reboot
    # with the same host_id): the list is an orphan all the same.
    unrelated = subprocess.Popen(["sleep", "30"])
    reaper.add(unrelated.pid)
    # A worker of an earlier supervisor of this host, still draining on its own: not an
    # orphan while it runs (its task would run twice).
    draining = subprocess.Popen([sys.executable, "-c", (
        "import setproctitle, time; setproctitle.setproctitle("
        f"'workerpool: worker 1 [{QUEUE}] draining 1/1 done=0'); time.sleep(30)")])
    reaper.add(draining.pid)
    try:
        ours = f"{PREFIX}:processing:host-workerpool:1-{unrelated.pid}"
        redis_client.lpush(ours, json.dumps(new_task("t", {}, id="orphan")))
        # Host "host-workerpool:b" is not this host, though the sweep's pattern matches it.
        other = f"{PREFIX}:processing:host-workerpool:b:1-999999999"
        redis_client.lpush(other, json.dumps(new_task("t", {}, id="not-ours")))
        still_running = f"{PREFIX}:processing:host-workerpool:1-{draining.pid}"
        redis_client.lpush(still_running, json.dumps(new_task("t", {}, id="draining")))
        # The same pid under another worker number: not that worker, an orphan.
        wrong_number = f"{PREFIX}:processing:host-workerpool:2-{draining.pid}"
        redis_client.lpush(wrong_number, json.dumps(new_task("t", {}, id="renumbered")))
        wait_for(lambda: f"[{QUEUE}]".encode() in open(f"/proc/{draining.pid}/cmdline",
                                                       "rb").read(), 10)
        pool = start_pool(pool_ini(workers=1))
        wait_running(pool, 1)
        orphans = {"orphan", "renumbered"}
        wait_for(lambda: set(ids_of(redis_client, "test:done")) == orphans, 10)
        assert redis_client.llen(other) == 1
        assert pool.log().count("requeued 1 task(s) of dead process") == 2
        time.sleep(5.5)  # past the next periodic sweep
        assert redis_client.llen(other) == 1
        assert sorted(ids_of(redis_client, "test:done")) == sorted(orphans)
        assert redis_client.llen(still_running) == 1
        draining.kill()
        draining.wait(5)
        wait_for(lambda: set(ids_of(redis_client, "test:done")) == {*orphans, "draining"}, 10)
        os.kill(pool.pid, signal.SIGTERM)
        assert pool.wait(15) == 0
    finally:
        for process in (unrelated, draining):
            process.kill()
            process.wait(5)


def test_daemon_start_fails_visibly_when_the_pidfile_cannot_be_created(pool_ini, tmp_path):
    pidfile = tmp_path / "pid-is-a-directory"
    pidfile.mkdir()
    ini = pool_ini(pidfile=pidfile, log_file=tmp_path / "pool.log")
    result = run_cli(ini, "start", timeout=20)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot create the pidfile {pidfile}: Is a directory" in result.stderr
    assert "in the background" not in result.stdout and "Traceback" not in result.stderr


def test_reaper_kills_only_a_pid_that_is_still_the_process_it_was_given(reaper):
    from conftest import ProcessReaper

    own = ProcessReaper()
    process = subprocess.Popen(["sleep", "30"])
    reaper.add(process.pid)
    try:
        own.add(process.pid)
        # The recorded start time no longer matches: the pid now names another process.
        own.pids[process.pid] -= 1
        own.kill_all()
        time.sleep(0.1)
        assert process.poll() is None
        own.add(process.pid)
        own.kill_all()
        assert process.wait(5) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait(5)


def _in_process_supervisor(tmp_path, redis_url, **settings):
    """A Supervisor object driven by hand: no fork, no signals (pure bookkeeping tests)."""
    from workerpool.config import load_config
    from workerpool.supervisor import Supervisor

    overrides = {"pidfile": str(tmp_path / "wp.pid"), "redis_url": redis_url,
                 "host_id": "h", **settings}
    config = load_config(None, search=False, environ={}, overrides=overrides)
    return Supervisor(config, handler=lambda task: None)


@pytest.mark.parametrize("written", [True, False])
def test_results_of_a_dead_worker_wait_until_redis_tells_whether_they_were_written(
        tmp_path, redis_url, redis_client, written):
    from workerpool.supervisor import WorkerProcess

    supervisor = _in_process_supervisor(tmp_path, redis_url, max_tasks="10")
    scoreboard = supervisor.scoreboard
    try:
        # Slot 0 reserved 4 tasks and died while writing the results of 3 of them.
        scoreboard.claim_slot(0, 4711, 0)
        assert scoreboard.reserve(0, 4) == 4
        scoreboard.set(0, "settle_token", 0xABC)
        scoreboard.set(0, "settling", 3)
        worker = WorkerProcess(0, 4711, time.monotonic())
        supervisor._redis_failed_this_tick = True  # Redis cannot be asked in this tick
        kept = supervisor._count_last_settlement(worker)
        scoreboard.reclaim(0, keep=kept)
        assert kept == 3 and scoreboard.totals() == (3, 0, 10)  # the 3 stay taken meanwhile
        key = supervisor.queue.keys.processing("h", worker.list_id)
        if written:
            redis_client.set(supervisor.queue.keys.settled(key), "abc")
        supervisor._redis_failed_this_tick = False
        supervisor._resolve_settlements()
        assert scoreboard.totals() == ((3, 3, 10) if written else (0, 0, 10))
        assert supervisor.unresolved_settlements == {}
    finally:
        supervisor._client.close()


def test_at_stop_refused_requeues_are_retried_or_left_to_the_other_hosts(
        tmp_path, redis_url, redis_client, monkeypatch):
    import redis as redis_module

    from workerpool import supervisor as supervisor_module
    from workerpool.protocol import new_task

    monkeypatch.setattr(supervisor_module, "SHUTDOWN_REDIS_GRACE", 1.0)
    for redis_comes_back in (True, False):
        redis_client.flushall()
        supervisor = _in_process_supervisor(tmp_path, redis_url)
        queue = supervisor.queue
        queue.heartbeat("h", b"{}", ttl=60)
        key = queue.keys.processing("h", "1-4711")
        redis_client.lpush(key, json.dumps(new_task("t", {}, id="left")))
        supervisor.requeue_later = {key: True}  # refused while the workers exited
        real_requeue, calls = queue.requeue, []

        def requeue(*args, _comes_back=redis_comes_back, _real=real_requeue, _calls=calls):
            _calls.append(args)
            if len(_calls) == 1 or not _comes_back:
                raise redis_module.ConnectionError("redis is away")
            return _real(*args)

        monkeypatch.setattr(queue, "requeue", requeue)
        supervisor._shutdown()
        if redis_comes_back:  # retried at stop: back in the queue, the host forgotten
            assert len(calls) == 2 and redis_client.llen(QUEUE) == 1
            assert redis_client.zscore(queue.keys.hosts, "h") is None
        else:  # the host stays in {T}:hosts, so another host requeues it after host_timeout
            assert len(calls) >= 2 and redis_client.llen(key) == 1
            assert redis_client.zscore(queue.keys.hosts, "h") is not None
