"""The queue tools and error paths of the `workerpool` command, run as real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis_server import free_port

TESTS = str(Path(__file__).resolve().parent)
PROJECT = str(Path(TESTS).parent)
QUEUE = "async_tasks"
DEAD = "{async_tasks}:dead"


def cli_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WORKERPOOL_") and name != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = TESTS
    return env


def run_cli(ini: str, *args: str, stdin_text: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `workerpool --config INI ARGS...`; stdin is not a terminal (empty unless given)."""
    kwargs: dict = {"input": stdin_text} if stdin_text is not None else {
        "stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "workerpool.cli", "--config", ini, *args],
                          capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          cwd=PROJECT, **kwargs)


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    data = handle.read()
            except OSError:
                continue
            if int(data[data.rfind(b")") + 1:].split()[1]) == pid:
                found.add(int(entry))
    return found


def run_pool(ini: str, reaper, *args: str, timeout: float = 30) -> tuple[int, str]:
    """`start --foreground ARGS` until it exits; every pid it forks is given to the reaper."""
    process = subprocess.Popen(
        [sys.executable, "-m", "workerpool.cli", "--config", ini, "start", "--foreground", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=cli_env(), cwd=PROJECT)
    reaper.add(process.pid)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        for pid in children(process.pid):
            reaper.add(pid)
        time.sleep(0.05)
    try:
        _, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the pool did not exit within {timeout}s") from None
    return process.returncode, stderr


@pytest.fixture
def ini(tmp_path: Path, redis_url: str) -> str:
    path = tmp_path / "workerpool.ini"
    path.write_text("\n".join([
        "[workerpool]",
        f"redis_url = {redis_url}",
        f"redis_key = {QUEUE}",
        f"pidfile = {tmp_path / 'workerpool.pid'}",
        "handler = sample_handlers:flaky",
        "host_id = cli-test",
        "workers = 1",
        "interval = 0.2",
        "max_retries = 0",
        "drain_timeout = 5",
    ]) + "\n")
    return str(path)


def queued(redis_client, key: str = QUEUE) -> list[dict]:
    """The queue's tasks, oldest (next to run) first."""
    return [json.loads(raw) for raw in reversed(redis_client.lrange(key, 0, -1))]


# --- enqueue


def test_enqueue_type_and_data_prints_the_id(ini, redis_client):
    before = time.time()
    result = run_cli(ini, "enqueue", "email", '{"to": "a@example.com"}')
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", task_id)
    [task] = queued(redis_client)
    assert task["type"] == "email" and task["data"] == {"to": "a@example.com"}
    assert task["id"] == task_id and task["attempts"] == 0
    assert isinstance(task["enqueued_at"], float) and before <= task["enqueued_at"] <= time.time()

    chosen = run_cli(ini, "enqueue", "file_process", "--id", "mine")
    assert chosen.returncode == 0 and chosen.stdout.strip() == "mine"
    assert [t["id"] for t in queued(redis_client)] == [task_id, "mine"]
    assert queued(redis_client)[1]["data"] == {}

    other = run_cli(ini, "enqueue", "email", "--redis-key", "other", "-q")
    assert other.returncode == 0 and other.stdout == ""
    assert len(queued(redis_client, "other")) == 1 and redis_client.llen(QUEUE) == 2


def test_enqueue_rejects_bad_data_and_missing_type(ini, redis_client):
    bad = run_cli(ini, "enqueue", "email", "{not json")
    assert bad.returncode == 2
    assert "DATA is not JSON" in bad.stderr
    nothing = run_cli(ini, "enqueue")
    assert nothing.returncode == 2 and "TYPE" in nothing.stderr
    assert redis_client.llen(QUEUE) == 0


def test_enqueue_json_lines_from_stdin(ini, redis_client):
    lines = "\n".join([
        '{"type": "a", "data": {"n": 1}}',
        "",
        '{"type": "b", "id": "fixed", "extra": "kept"}',
        '{"type": "c", "attempts": 2}',
    ]) + "\n"
    result = run_cli(ini, "enqueue", "--file", "-", stdin_text=lines)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"enqueued 3 task(s) to {QUEUE}"
    tasks = queued(redis_client)
    assert [t["type"] for t in tasks] == ["a", "b", "c"]  # FIFO: the first line runs first
    assert tasks[0]["data"] == {"n": 1} and tasks[1]["data"] == {}
    assert tasks[1]["id"] == "fixed" and tasks[1]["extra"] == "kept"
    assert tasks[2]["attempts"] == 2 and tasks[0]["attempts"] == 0
    assert len({t["id"] for t in tasks}) == 3
    assert all(isinstance(t["enqueued_at"], float) for t in tasks)


def test_enqueue_from_a_file(ini, redis_client, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"type": "t", "id": f"f{i}"}) + "\n" for i in range(5)))
    result = run_cli(ini, "enqueue", "--file", str(path))
    assert result.returncode == 0, result.stderr
    assert [t["id"] for t in queued(redis_client)] == [f"f{i}" for i in range(5)]


@pytest.mark.parametrize(("line", "message"), [
    ('{"type": "b", oops}', "line 2: not JSON"),
    ('[1, 2]', "line 2: not a task"),
    ('{"data": {}}', "line 2: not a task"),
])
def test_enqueue_bad_line_exits_2_and_enqueues_nothing(ini, redis_client, line, message):
    lines = '{"type": "a"}\n' + line + '\n{"type": "c"}\n'
    result = run_cli(ini, "enqueue", "--file", "-", stdin_text=lines)
    assert result.returncode == 2
    assert message in result.stderr
    assert redis_client.llen(QUEUE) == 0


# --- clear


def test_clear(ini, redis_client):
    run_cli(ini, "enqueue", "--file", "-", "-q",
            stdin_text="".join('{"type": "t"}\n' for _ in range(5)))
    assert redis_client.llen(QUEUE) == 5
    refused = run_cli(ini, "clear")  # stdin is not a terminal: nobody to ask
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert redis_client.llen(QUEUE) == 5
    cleared = run_cli(ini, "clear", "--yes")
    assert cleared.returncode == 0, cleared.stderr
    assert "deleted 5 pending task(s)" in cleared.stdout
    assert redis_client.llen(QUEUE) == 0


# --- dead letters


def _fail_three(ini: str, redis_client, reaper) -> None:
    """Dead-letter three entries through a real pool: two malformed, one failing task."""
    redis_client.lpush(QUEUE, b"{not json", b"[1, 2]")  # a foreign producer's mistakes
    assert run_cli(ini, "enqueue", "flaky", "--id", "f1", "-q").returncode == 0
    code, log = run_pool(ini, reaper, "--max-tasks", "3")
    assert code == 0, log
    assert redis_client.llen(DEAD) == 3 and redis_client.llen(QUEUE) == 0


def _dead_json(ini: str, *args: str) -> list[dict]:
    result = run_cli(ini, "dead", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_dead_list_retry_purge(ini, redis_client, reaper):
    empty = run_cli(ini, "dead", "list")
    assert empty.returncode == 0 and "no dead letters" in empty.stdout
    _fail_three(ini, redis_client, reaper)

    table = run_cli(ini, "dead", "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["index", "failed", "reason"]
    for reason in ("invalid_json", "not_an_object", "max_retries"):
        assert reason in table.stdout

    entries = _dead_json(ini)
    assert [e["index"] for e in entries] == [0, 1, 2]
    by_reason = {e["reason"]: e for e in entries}
    assert set(by_reason) == {"invalid_json", "not_an_object", "max_retries"}
    failed = by_reason["max_retries"]
    assert json.loads(failed["task"])["id"] == "f1" and failed["attempts"] == 1
    assert "planned failure" in failed["error"]
    assert by_reason["invalid_json"]["task"] == "{not json"
    assert len(_dead_json(ini, "--limit", "1")) == 1

    retried = run_cli(ini, "dead", "retry", str(failed["index"]))
    assert retried.returncode == 0, retried.stderr
    assert "requeued 1 dead letter(s)" in retried.stdout
    [task] = queued(redis_client)
    assert task["id"] == "f1" and task["attempts"] == 0  # a fresh start
    assert {e["reason"] for e in _dead_json(ini)} == {"invalid_json", "not_an_object"}

    missing = run_cli(ini, "dead", "retry", "9")
    assert missing.returncode == 2 and "no dead letter at index 9" in missing.stderr
    neither = run_cli(ini, "dead", "retry")
    assert neither.returncode == 2
    assert redis_client.llen(DEAD) == 2

    every = run_cli(ini, "dead", "retry", "--all")
    assert every.returncode == 0 and "requeued 2 dead letter(s)" in every.stdout
    assert redis_client.llen(DEAD) == 0
    raws = redis_client.lrange(QUEUE, 0, -1)
    assert len(raws) == 3 and {b"[1, 2]", b"{not json"} <= set(raws)  # byte for byte

    # The revived tasks are the originals: a second run dead-letters them the same way.
    code, log = run_pool(ini, reaper, "--max-tasks", "3")
    assert code == 0, log
    assert {e["reason"] for e in _dead_json(ini)} == {"invalid_json", "not_an_object",
                                                      "max_retries"}
    refused = run_cli(ini, "dead", "purge")
    assert refused.returncode == 2 and redis_client.llen(DEAD) == 3
    purged = run_cli(ini, "dead", "purge", "--yes")
    assert purged.returncode == 0 and "purged 3 dead letter(s)" in purged.stdout
    assert redis_client.llen(DEAD) == 0
    assert redis_client.llen(QUEUE) == 0


# --- stats


def test_stats(ini, redis_client):
    run_cli(ini, "enqueue", "--file", "-", "-q", stdin_text='{"type": "t"}\n{"type": "u"}\n')
    redis_client.lpush(DEAD, b'{"task": "x", "reason": "test"}')
    result = run_cli(ini, "stats", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"pending": 2, "processing": 0, "retry": 0, "dead": 1,
                                         "hosts": 0, "throughput_1m": None}
    text = run_cli(ini, "stats")
    assert text.returncode == 0
    assert text.stdout.splitlines()[1].split() == ["2", "0", "0", "1", "0", "-"]


def test_stats_sums_the_throughput_of_live_hosts(ini, redis_client):
    from workerpool.protocol import SyncQueue

    queue = SyncQueue(redis_client, QUEUE)
    queue.heartbeat("host-a", json.dumps({"throughput_1m": 10.5}).encode())
    queue.heartbeat("host-b", json.dumps({"throughput_1m": 4.5}).encode())
    result = run_cli(ini, "stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["hosts"], stats["throughput_1m"]) == (2, 15.0)


def test_supervisor_throughput_over_the_last_minute(tmp_path):
    from workerpool.config import load_config
    from workerpool.supervisor import Supervisor

    config = load_config(None, search=False, environ={},
                         overrides={"pidfile": str(tmp_path / "wp.pid")})
    supervisor = Supervisor(config, handler=lambda task: None)
    assert supervisor.throughput() is None  # not two samples yet
    # (monotonic time, tasks finished so far): samples older than a minute are not counted.
    supervisor.throughput_samples.extend([(0.0, 0), (30.0, 1000), (60.0, 1600), (90.0, 2500)])
    assert supervisor.throughput() == round((2500 - 1000) / 60, 2)


def test_stats_with_redis_down_exits_1_and_masks_the_password(tmp_path):
    port = free_port()
    path = tmp_path / "down.ini"
    path.write_text(f"[workerpool]\nredis_url = redis://:hunter2@127.0.0.1:{port}/0\n"
                    f"pidfile = {tmp_path / 'down.pid'}\n")
    result = run_cli(str(path), "stats", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert f"redis://:***@127.0.0.1:{port}/0" in report["error"]
    assert "hunter2" not in result.stdout + result.stderr


# --- bad configuration, and commands for a pool that is not running


@pytest.mark.parametrize("command", [["start", "--foreground"], ["status"], ["stats"]])
def test_bad_config_exits_2(tmp_path, command):
    path = tmp_path / "bad.ini"
    path.write_text(f"[workerpool]\nworkers = zero\npidfile = {tmp_path / 'bad.pid'}\n")
    result = run_cli(str(path), *command)
    assert result.returncode == 2
    assert "config error" in result.stderr
    assert "workers" in result.stderr and "zero" in result.stderr
    assert str(path) in result.stderr
    assert not (tmp_path / "bad.pid").exists()


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli(str(tmp_path / "nope.ini"), "status")
    assert result.returncode == 2
    assert "config error" in result.stderr and "nope.ini" in result.stderr


def test_bad_command_line_value_exits_2(ini):
    result = run_cli(ini, "start", "--foreground", "--workers", "-3")
    assert result.returncode == 2
    assert "config error" in result.stderr and "workers" in result.stderr


def test_commands_when_not_running(ini):
    reload = run_cli(ini, "reload")
    assert reload.returncode == 1
    assert "not running" in reload.stderr
    stop = run_cli(ini, "stop")
    assert stop.returncode == 0
    assert "not running" in stop.stdout
    status = run_cli(ini, "status")
    assert status.returncode == 3
    assert "workerpool is not running" in status.stdout
    assert "pending 0, processing 0, retry 0, dead 0" in status.stdout
    report = run_cli(ini, "status", "--json")
    assert report.returncode == 3
    parsed = json.loads(report.stdout)
    assert parsed["state"] == "not running" and parsed["pid"] is None
    assert parsed["queue"] == {"pending": 0, "processing": 0, "retry": 0, "dead": 0}


def test_enqueue_shows_progress_on_a_terminal(ini, redis_client, tmp_path):
    import pty

    lines = tmp_path / "many.jsonl"
    lines.write_text("".join(f'{{"type": "bulk", "data": {{"n": {n}}}}}\n'
                             for n in range(12_000)))
    leader, follower = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "workerpool.cli", "--config", ini, "enqueue", "--file",
             str(lines)], env=cli_env(), stdout=subprocess.PIPE, stderr=follower, timeout=60)
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    assert result.returncode == 0
    assert b"12000/12000 task(s)" in shown and b"1000/12000" in shown
    assert redis_client.llen(QUEUE) == 12_000
    assert b"enqueued 12000 task(s)" in result.stdout


def test_password_on_the_command_line_is_not_shown_by_ps(tmp_path, redis_url, reaper):
    """The command line is replaced by the process title before anything slow happens."""
    port = redis_url.split(":")[2].split("/")[0]
    ini = tmp_path / "wp.ini"
    ini.write_text(f"[workerpool]\npidfile = {tmp_path / 'wp.pid'}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "workerpool.cli", "--config", str(ini), "start", "--foreground",
         "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reaper.add(process.pid)
    try:
        def title() -> str:
            with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
                return handle.read().replace(b"\0", b" ").decode()

        shown = wait_for_value(lambda: title() if "supervisor" in title() else None)
        assert "hunter2" not in shown and "workerpool: supervisor" in shown
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    # The server has no password: the start fails, and says so without the password.
    assert "hunter2" not in stderr.decode()


def wait_for_value(probe, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_password_on_the_command_line_of_any_command_is_not_shown_by_ps(tmp_path, redis_url,
                                                                        reaper):
    """Not only `start`: `enqueue --file -` waits on its stdin with the URL in its argv."""
    port = redis_url.split(":")[2].split("/")[0]
    ini = tmp_path / "wp.ini"
    ini.write_text(f"[workerpool]\npidfile = {tmp_path / 'wp.pid'}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "workerpool.cli", "--config", str(ini), "enqueue", "--file", "-",
         "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0"],
        env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reaper.add(process.pid)
    try:
        def title() -> str:
            with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
                return handle.read().replace(b"\0", b" ").decode()

        shown = wait_for_value(lambda: title() if "enqueue" in title() and "python" not in
                               title() else None)
        assert "hunter2" not in shown and shown.startswith("workerpool: enqueue")
    finally:
        process.kill()
        process.communicate(timeout=30)


def test_status_all_hosts_of_an_embedded_pool_not_running_exits_3(tmp_path):
    path = tmp_path / "embedded.ini"
    path.write_text("\n".join([
        "[workerpool]", "redis_url = embedded", f"run_dir = {tmp_path / 'run'}",
        f"state_dir = {tmp_path / 'state'}", f"pidfile = {tmp_path / 'run' / 'wp.pid'}",
    ]) + "\n")
    result = run_cli(str(path), "status", "--all-hosts")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "workerpool is not running" in result.stdout
    assert "runs only while the pool runs" in result.stdout
    report = run_cli(str(path), "status", "--all-hosts", "--json")
    assert report.returncode == 3
    assert "runs only while the pool runs" in json.loads(report.stdout)["hosts"]["error"]


HOLD_PIDFILE = """
import signal, sys, time
from workerpool.daemon import PidFile
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a pool that does not stop on TERM
PidFile(sys.argv[1]).acquire()
time.sleep(60)
"""


def hold_pidfile(pidfile: Path, reaper, mode: str = "") -> subprocess.Popen:
    """A process (of this user) that holds `pidfile` locked, as a running pool does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_PIDFILE, str(pidfile), mode or "-"],
                              env={**cli_env(), "PYTHONPATH": PROJECT})
    reaper.add(holder.pid)
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip() == str(holder.pid)):
        assert time.monotonic() < deadline and holder.poll() is None, "pidfile not taken"
        time.sleep(0.02)
    return holder


STOP_AS_NOBODY = """
import os, sys
from workerpool import cli  # imported as root: the interpreter's files are root's only
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(cli.main(["--config", sys.argv[1], "stop"]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a pool of another user")
def test_stop_of_another_users_pool_is_a_clear_error(reaper):
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="workerpool-stop-"))
    try:
        shared.chmod(0o755)  # nobody reads the config and the pidfile here
        pidfile = shared / "wp.pid"
        ini = shared / "wp.ini"
        ini.write_text(f"[workerpool]\npidfile = {pidfile}\n")
        ini.chmod(0o644)
        holder = hold_pidfile(pidfile, reaper)
        try:
            result = subprocess.run([sys.executable, "-c", STOP_AS_NOBODY, str(ini)],
                                    capture_output=True, text=True, timeout=30,
                                    env={**cli_env(), "PYTHONPATH": PROJECT}, cwd="/")
            assert result.returncode == 1, result.stdout + result.stderr
            assert "Traceback" not in result.stderr
            assert (f"not allowed to signal the pool (pid {holder.pid}, another user's): run "
                    "this as root or as the pool's user") in result.stderr
            assert holder.poll() is None
        finally:
            holder.kill()
            holder.wait(10)
    finally:
        import shutil

        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.slow
def test_stop_waits_drain_timeout_and_a_margin_by_default(tmp_path, reaper):
    from workerpool.cli import STOP_MARGIN

    pidfile = tmp_path / "wp.pid"
    ini = tmp_path / "wp.ini"
    ini.write_text(f"[workerpool]\npidfile = {pidfile}\ndrain_timeout = 0.5\n")
    holder = hold_pidfile(pidfile, reaper, "ignore-term")
    try:
        started = time.monotonic()
        # The old fixed 60 s default would outlast this timeout.
        result = run_cli(str(ini), "stop", timeout=STOP_MARGIN + 20)
        waited = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"still running after {0.5 + STOP_MARGIN:g}s: sending SIGQUIT" in result.stderr
        assert 0.5 + STOP_MARGIN <= waited < 0.5 + STOP_MARGIN + 10
        assert holder.wait(5) == -3  # SIGQUIT
    finally:
        holder.kill()
        holder.wait(10)
