"""Daemon glue: pidfile locking across processes, status files, users, sd_notify, detaching."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workerpool import daemon, sdnotify
from workerpool.config import ConfigError
from workerpool.daemon import (
    AlreadyRunning,
    PidFile,
    pidfile_state,
    read_json,
    resolve_user,
    status_path,
    wait_for_exit,
    write_json_atomic,
)

PROJECT = str(Path(__file__).resolve().parent.parent)
IS_ROOT = os.geteuid() == 0


def run_python(code: str, *, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter (another process: POSIX locks are per process)."""
    env = dict(os.environ, PYTHONPATH=PROJECT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def spawn_python(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=PROJECT)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def state_seen_by_another_process(path: Path) -> tuple[str, int | None]:
    result = run_python(
        f"""
        from workerpool.daemon import pidfile_state
        state, pid = pidfile_state({str(path)!r})
        print(state, pid)
        """
    )
    assert result.returncode == 0, result.stderr
    state, pid = result.stdout.split()
    return state, None if pid == "None" else int(pid)


@pytest.fixture
def pidfile_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "workerpool.pid"


# --- PidFile


def test_acquire_writes_pid_and_release_unlinks(pidfile_path: Path) -> None:
    pidfile = PidFile(str(pidfile_path))
    pidfile.acquire()  # also creates the missing parent directory
    try:
        assert pidfile_path.read_text() == f"{os.getpid()}\n"
        assert pidfile_path.parent.stat().st_mode & 0o777 == 0o755 & ~_umask()
        assert pidfile_state(str(pidfile_path)) == ("running", os.getpid())
    finally:
        pidfile.release()
    assert not pidfile_path.exists()
    assert pidfile_state(str(pidfile_path)) == ("absent", None)
    pidfile.release()  # twice is harmless


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_second_acquire_from_another_process_reports_our_pid(pidfile_path: Path) -> None:
    with PidFile(str(pidfile_path)):
        result = run_python(
            f"""
            import sys
            from workerpool.daemon import AlreadyRunning, PidFile
            try:
                PidFile({str(pidfile_path)!r}).acquire()
            except AlreadyRunning as exc:
                print(exc.pid)
                sys.exit(3)
            """
        )
        assert result.returncode == 3, result.stderr
        assert int(result.stdout) == os.getpid()
        # The pid comes from the file: the loser wrote nothing.
        assert state_seen_by_another_process(pidfile_path) == ("running", os.getpid())
    assert not pidfile_path.exists()


def test_second_acquire_in_same_process_fails_and_keeps_the_lock(pidfile_path: Path) -> None:
    with PidFile(str(pidfile_path)):
        with pytest.raises(AlreadyRunning) as caught:
            PidFile(str(pidfile_path)).acquire()
        assert caught.value.pid == os.getpid()
        # Neither that nor pidfile_state here may open and close the file: closing any fd of a
        # file drops this process's POSIX lock on it.
        assert pidfile_state(str(pidfile_path)) == ("running", os.getpid())
        assert state_seen_by_another_process(pidfile_path) == ("running", os.getpid())


def test_forked_child_neither_holds_nor_removes_the_lock(pidfile_path: Path) -> None:
    pidfile = PidFile(str(pidfile_path))
    pidfile.acquire()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                state, pid = pidfile_state(str(pidfile_path))
                pidfile.release()  # e.g. atexit in a worker: must leave the parent's file alone
                code = 0 if (state, pid) == ("running", os.getppid()) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # Read by another process: opening the file here would drop our lock (POSIX semantics).
        assert state_seen_by_another_process(pidfile_path) == ("running", os.getpid())
    finally:
        pidfile.release()


def test_pidfile_of_killed_process_is_stale_and_can_be_taken_over(pidfile_path: Path) -> None:
    holder = spawn_python(
        f"""
        import sys, time
        from workerpool.daemon import PidFile
        PidFile({str(pidfile_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert pidfile_state(str(pidfile_path)) == ("running", holder.pid)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert pidfile_path.exists()  # SIGKILL: nobody cleaned up
    assert pidfile_state(str(pidfile_path)) == ("stale", holder.pid)
    with PidFile(str(pidfile_path)):
        assert pidfile_path.read_text() == f"{os.getpid()}\n"
        assert pidfile_state(str(pidfile_path)) == ("running", os.getpid())


def test_pidfile_state_absent_and_unlocked_files(tmp_path: Path) -> None:
    assert pidfile_state(str(tmp_path / "nothing.pid")) == ("absent", None)
    garbage = tmp_path / "garbage.pid"
    garbage.write_text("not a pid\n")
    assert pidfile_state(str(garbage)) == ("stale", None)
    # A live pid in a file nobody locks (pid reuse after a crash) is still stale.
    unlocked = tmp_path / "unlocked.pid"
    unlocked.write_text(f"{os.getppid()}\n")
    assert pidfile_state(str(unlocked)) == ("stale", os.getppid())


def test_pidfile_is_world_readable_whatever_the_umask(pidfile_path: Path) -> None:
    old = os.umask(0o027)  # systemd's UMask= in our unit
    try:
        with PidFile(str(pidfile_path)):
            assert pidfile_path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_pidfile_is_usable_as_daemon_context_pidfile(pidfile_path: Path) -> None:
    pidfile = PidFile(str(pidfile_path))
    with pidfile as entered:
        assert entered is pidfile
        assert pidfile_path.exists()
    assert not pidfile_path.exists()


def test_acquire_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "workerpool.pid"
    link.symlink_to(target)
    with pytest.raises(OSError):
        PidFile(str(link)).acquire()
    assert not target.exists()


# --- status file


def test_status_path() -> None:
    assert status_path("/run/workerpool/workerpool.pid") == "/run/workerpool/workerpool.status.json"
    assert status_path("/run/wp/pidfile") == "/run/wp/pidfile.status.json"


def test_write_json_atomic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "workerpool.status.json"
    data = {"pid": 42, "workers": [{"id": 1, "state": "idle"}], "queue": "émails"}
    write_json_atomic(str(path), data)
    assert read_json(str(path)) == data
    write_json_atomic(str(path), {"pid": 43}, durable=True)
    assert read_json(str(path)) == {"pid": 43}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workerpool.status.json"]  # no temps
    assert path.stat().st_mode & 0o777 == 0o644 & ~_umask()


def test_write_json_atomic_leaves_no_temp_file_on_error(tmp_path: Path) -> None:
    in_the_way = tmp_path / "status.json"  # a non-empty directory: os.replace fails
    in_the_way.mkdir()
    (in_the_way / "keep").touch()
    with pytest.raises(OSError):
        write_json_atomic(str(in_the_way), {"pid": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_read_json_missing_or_garbage_is_none(tmp_path: Path) -> None:
    assert read_json(str(tmp_path / "missing.json")) is None
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"pid": 4')
    assert read_json(str(garbage)) is None
    garbage.write_bytes(b"\xff\xfe not utf-8")
    assert read_json(str(garbage)) is None
    garbage.write_text("[1, 2]")
    assert read_json(str(garbage)) is None


# --- users


def test_resolve_user() -> None:
    assert resolve_user("root", "") == (0, 0)
    assert resolve_user("0", "0") == (0, 0)
    assert resolve_user("", "") == (None, None)
    assert resolve_user("", "root") == (None, 0)


def test_resolve_user_unknown_names_the_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"user = 'no-such-user-wp': no such user"):
        resolve_user("no-such-user-wp", "")
    with pytest.raises(ConfigError, match=r"group = 'no-such-group-wp': no such group"):
        resolve_user("root", "no-such-group-wp")


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_drop_privileges_switches_groups_gid_and_uid() -> None:
    result = run_python(
        """
        import json, os
        from workerpool.daemon import drop_privileges, resolve_user
        uid, gid = resolve_user("nobody", "")
        os.setgroups([0, 1, 2])  # root's supplementary groups must not survive
        drop_privileges(uid, gid)
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        print(json.dumps({
            "expected": [uid, gid],
            "uids": [os.getuid(), os.geteuid()],
            "gids": [os.getgid(), os.getegid()],
            "groups": os.getgroups(),
            "regained": regained,
        }))
        """
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    uid, gid = seen["expected"]
    assert seen["uids"] == [uid, uid]
    assert seen["gids"] == [gid, gid]
    assert not {0, 1, 2} & set(seen["groups"])
    assert seen["regained"] is False


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become someone else first")
def test_drop_privileges_is_a_no_op_without_root() -> None:
    result = run_python(
        """
        import os
        from workerpool.daemon import drop_privileges
        os.setgid(65534); os.setuid(65534)
        drop_privileges(0, 0)
        print(os.getuid(), os.getgid())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["65534", "65534"]


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_prepare_paths_hands_only_our_directories_to_the_user(tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # like /run or /var/log: holds other programs' files
    shared.mkdir()
    (shared / "other.pid").write_text("1\n")
    log = shared / "workerpool.log"
    log.write_text("old line\n")
    pidfile = tmp_path / "new" / "run" / "workerpool.pid"
    daemon.prepare_paths(str(pidfile), str(log), 65534, 65534)
    assert pidfile.parent.is_dir()
    assert (pidfile.parent.stat().st_uid, pidfile.parent.stat().st_gid) == (65534, 65534)
    assert shared.stat().st_uid == 0  # never chown a directory shared with others
    assert (log.stat().st_uid, log.stat().st_gid) == (65534, 65534)
    # An existing directory holding only our own files is ours: handed over too.
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "workerpool.status.json").write_text("{}")
    daemon.prepare_paths(str(ours / "workerpool.pid"), "", 65534, None)
    assert (ours.stat().st_uid, ours.stat().st_gid) == (65534, 0)


def test_prepare_paths_without_user_only_creates(tmp_path: Path) -> None:
    pidfile = tmp_path / "a" / "workerpool.pid"
    log = tmp_path / "b" / "c" / "workerpool.log"
    daemon.prepare_paths(str(pidfile), str(log), None, None)
    assert pidfile.parent.is_dir() and log.parent.is_dir()


# --- sd_notify


@pytest.fixture
def fresh_notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    sdnotify._forget()
    yield
    sdnotify._forget()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sockaddr_un holds 108 bytes: pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="wp-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def _listener(address: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(5)
    return listener


def test_notify_reaches_the_socket(
    fresh_notify: None, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(short_dir / "notify")
    with _listener(path) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.notify("READY=1") is True
        assert listener.recv(4096) == b"READY=1"
        assert sdnotify.notify("STATUS=2 workers, 0 busy\nWATCHDOG=1") is True
        assert listener.recv(4096) == b"STATUS=2 workers, 0 busy\nWATCHDOG=1"


def test_notify_abstract_namespace(fresh_notify: None, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"workerpool-test-{os.getpid()}-{time.monotonic_ns()}"
    with _listener("\0" + name) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1") is True
        assert listener.recv(4096) == b"READY=1"


def test_notify_follows_a_changed_socket(
    fresh_notify: None, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _listener(str(short_dir / "one")) as one, _listener(str(short_dir / "two")) as two:
        monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "one"))
        assert sdnotify.notify("READY=1")
        monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "two"))
        assert sdnotify.notify("STOPPING=1")
        assert one.recv(4096) == b"READY=1"
        assert two.recv(4096) == b"STOPPING=1"


def test_notify_without_socket_or_listener_is_false(
    fresh_notify: None, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False  # OSError swallowed


def test_notify_survives_its_descriptor_being_closed_and_reused(
    fresh_notify: None, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What python-daemon does: close every fd, then the pidfile gets the same number.
    with _listener(str(short_dir / "notify")) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "notify"))
        assert sdnotify.notify("READY=1")
        assert listener.recv(4096) == b"READY=1"
        number = sdnotify._sock.fileno()
        os.close(number)
        other = os.open(str(short_dir / "file"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert other == number
            assert sdnotify.notify("WATCHDOG=1")
            assert listener.recv(4096) == b"WATCHDOG=1"
            os.fstat(other)  # still open: the old socket object did not close it
            assert os.path.samestat(os.fstat(other), os.stat(short_dir / "file"))
        finally:
            os.close(other)


def test_watchdog_interval(fresh_notify: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "garbage")
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


# --- waiting for a process


def test_wait_for_exit_sees_a_process_end() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    ticks = []
    try:
        # Not reaped by us while waiting: the zombie must count as gone.
        assert wait_for_exit(child.pid, 10, poll=0.05, on_tick=lambda: ticks.append(1)) is True
        assert ticks
    finally:
        child.wait()
    assert wait_for_exit(child.pid, 1) is True  # reaped: no such process


def test_wait_for_exit_times_out() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = time.monotonic()
        assert wait_for_exit(child.pid, 0.2) is False
        assert time.monotonic() - started < 2
    finally:
        child.kill()
        child.wait()


def test_wait_for_exit_ignores_nonsense_pids() -> None:
    assert wait_for_exit(0, 0.1) is True  # never os.kill(0, ...): that is our process group
    assert wait_for_exit(-1, 0.1) is True


# --- daemonize


DAEMON_SNIPPET = """
import os, sys, time
from workerpool.daemon import PidFile, daemonize
pidfile_path, marker, stop = sys.argv[1:4]
daemonize(PidFile(pidfile_path))
with open(marker, "w") as handle:
    handle.write(f"{os.getpid()} {os.getcwd()} {os.getsid(0)}")
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not os.path.exists(stop):
    time.sleep(0.05)
"""


@pytest.fixture
def start_daemon(tmp_path: Path, reaper) -> Iterator:
    """Run the snippet: (launcher pid, its exit code, seconds it took, pidfile, marker, stop).

    At the end the stop file is created whatever happened, so a daemon whose pid the test
    never learned (an assertion failed first) exits within 50 ms instead of living 30 s; one
    still alive after that is killed by pid.
    """
    pidfile = tmp_path / "run" / "wp.pid"
    marker, stop = tmp_path / "marker", tmp_path / "stop"

    def start() -> tuple[int, int, float, Path, Path, Path]:
        started = time.monotonic()
        launcher = subprocess.Popen(
            [sys.executable, "-c", DAEMON_SNIPPET, str(pidfile), str(marker), str(stop)],
            env=dict(os.environ, PYTHONPATH=PROJECT),
        )
        reaper.add(launcher.pid)
        code = launcher.wait(timeout=20)
        return launcher.pid, code, time.monotonic() - started, pidfile, marker, stop

    yield start
    stop.touch()
    daemon_pids = {_daemon_pid(pidfile)}
    if marker.exists() and marker.read_text().split():
        daemon_pids.add(int(marker.read_text().split()[0]))
    for pid in daemon_pids - {None}:
        reaper.add(pid)  # killed by the reaper unless it exits on the stop file now
        wait_for_exit(pid, 5)


def _daemon_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None


def test_daemonize_detaches_and_locks_the_pidfile(start_daemon) -> None:
    launcher, code, elapsed, pidfile, marker, _stop = start_daemon()
    pid = None
    try:
        assert code == 0
        # The daemon lives 30 s: returning within seconds means the launcher did not wait.
        assert elapsed < 10
        assert wait_until(lambda: _daemon_pid(pidfile) is not None and marker.exists())
        pid = _daemon_pid(pidfile)
        assert pid is not None and pid != launcher
        assert wait_until(lambda: len(marker.read_text().split()) == 3)
        marker_pid, cwd, sid = marker.read_text().split()
        assert int(marker_pid) == pid
        assert cwd == "/"
        assert int(sid) != os.getsid(0)  # its own session: no controlling terminal of ours
        os.kill(pid, 0)
        assert pidfile_state(str(pidfile)) == ("running", pid)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            assert wait_for_exit(pid, 10)
    assert pidfile_state(str(pidfile)) == ("stale", pid)


def test_daemon_exiting_normally_removes_its_pidfile(start_daemon) -> None:
    _launcher, code, _elapsed, pidfile, marker, stop = start_daemon()
    assert code == 0
    assert wait_until(lambda: _daemon_pid(pidfile) is not None and marker.exists())
    pid = _daemon_pid(pidfile)
    assert pid is not None
    try:
        stop.touch()
        assert wait_for_exit(pid, 10)
    finally:
        if not wait_for_exit(pid, 0):
            os.kill(pid, signal.SIGKILL)
    assert not pidfile.exists()


SWITCHING_SNIPPET = """
import json, os, sys, time
from workerpool.daemon import PidFile, daemonize, prepare_paths, resolve_user
pidfile_path, marker, workdir = sys.argv[1:4]
uid, gid = resolve_user("nobody", "")
prepare_paths(pidfile_path, "", uid, gid)
os.setgroups([0, 1])
daemonize(PidFile(pidfile_path), uid=uid, gid=gid, working_directory=workdir)
ids = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd()}
with open(marker, "w") as handle:
    json.dump(ids, handle)
time.sleep(30)
"""


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_daemonize_as_root_switches_user_after_entering_the_workdir(short_dir: Path) -> None:
    short_dir.chmod(0o755)  # the service user must reach its directory below
    workdir = short_dir / "root-only"
    workdir.mkdir(mode=0o700)
    pidfile = short_dir / "run" / "workerpool.pid"
    marker = pidfile.parent / "workerpool.marker"
    launcher = subprocess.run(
        [sys.executable, "-c", SWITCHING_SNIPPET, str(pidfile), str(marker), str(workdir)],
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, PYTHONPATH=PROJECT),
    )
    assert launcher.returncode == 0, launcher.stderr
    pid = None
    try:
        assert wait_until(lambda: _daemon_pid(pidfile) is not None)
        pid = _daemon_pid(pidfile)
        assert wait_until(lambda: read_json(str(marker)) is not None)
        seen = read_json(str(marker))
        assert (seen["uid"], seen["gid"]) == (65534, 65534)
        assert not {0, 1} & set(seen["groups"])
        assert seen["cwd"] == str(workdir)
        assert pidfile.stat().st_uid == 65534  # locked by the service user, in its directory
        assert pidfile_state(str(pidfile)) == ("running", pid)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for_exit(pid, 10)
        shutil.rmtree(short_dir / "run", ignore_errors=True)
        workdir.rmdir()


def test_daemonize_refuses_before_forking_when_running(tmp_path: Path) -> None:
    pidfile = tmp_path / "wp.pid"
    with PidFile(str(pidfile)):
        result = run_python(
            f"""
            import sys
            from workerpool.daemon import AlreadyRunning, PidFile, daemonize
            try:
                daemonize(PidFile({str(pidfile)!r}))
            except AlreadyRunning as exc:
                print("refused", exc.pid)
                sys.exit(3)
            print("daemonized?!")
            """
        )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.split() == ["refused", str(os.getpid())]
