"""Daemon glue: pidfile, status file, user switch, detaching, waiting for a pid to exit.

The pidfile is ours rather than python-daemon's (DESIGN.md, "Pitfalls already known"): one
fcntl.lockf record lock held by the supervisor for its whole life. lockf (POSIX) locks belong
to a process, are not inherited by forked workers, and vanish when the holder dies, so
"locked" means "a supervisor is alive" and an unlocked file is a stale one. The catch of POSIX
locks is that a process loses its lock when it closes ANY descriptor of that file: the
process holding the pidfile must never open it (not even to read it). The registry below keeps
this module from doing so; other code should ask pidfile_state() rather than read the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import os
import pwd
import secrets
import stat
import time
from collections.abc import Callable
from typing import Any

import daemon as python_daemon

from workerpool.config import ConfigError

# (st_dev, st_ino) of every pidfile this process has locked -> the pid that locked it. The pid
# tells a forked child, which inherits the dict but not the locks, that the entry is not its own.
_held: dict[tuple[int, int], int] = {}

_PID_READ_ATTEMPTS = 20  # the holder writes its pid right after locking: give it ~0.2 s
_LOCK_RETRIES = 5  # ~50 ms of retries before a held lock means "already running"
_LOCK_ATTEMPTS = 10  # a pidfile replaced under us this often is being fought over: give up


class AlreadyRunning(Exception):
    """The pidfile is locked by a live process, whose pid (if readable) is in `pid`."""

    def __init__(self, pid: int | None, path: str = "") -> None:
        where = f" ({path})" if path else ""
        shown = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"already running, {shown}{where}")
        self.pid = pid
        self.path = path


def _parse_pid(raw: bytes) -> int | None:
    try:
        pid = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return pid if pid > 0 else None


def _read_pid_fd(fd: int) -> int | None:
    return _parse_pid(os.pread(fd, 64, 0))


def _held_here(path: str) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return _held.get((info.st_dev, info.st_ino)) == os.getpid()


def _is_locked_error(exc: OSError) -> bool:
    return exc.errno in (errno.EACCES, errno.EAGAIN)


def _lock_exclusive(fd: int) -> None:
    # pidfile_state() in another process (`workerpool status`, a monitoring probe) holds a
    # shared lock for a few microseconds: retry briefly so that never reads as "running".
    for _attempt in range(_LOCK_RETRIES):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if not _is_locked_error(exc):
                raise
        time.sleep(0.01)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _alive(pid: int | None) -> bool:
    """Whether `pid` is a running process; a zombie has exited (and holds no locks)."""
    if pid is None or pid <= 0:
        return False  # os.kill(0 or -n, ...) would address whole process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            proc_stat = handle.read()
    except OSError:
        return True  # no /proc (or hidden by ProtectProc=): trust kill(0)
    # The command name in parentheses may itself hold spaces or ')': the state follows the last.
    fields = proc_stat[proc_stat.rfind(b")") + 1 :].split()
    return not fields or fields[0] not in (b"Z", b"X")


class PidFile:
    """A locked pidfile; usable as python-daemon's `DaemonContext(pidfile=...)`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"PidFile({self.path!r}, locked_by={self._pid})"

    def acquire(self) -> None:
        """Lock the file and write our pid; AlreadyRunning if a live process holds it."""
        if self._fd is not None and self._pid == os.getpid():
            return
        if _held_here(self.path):
            # Another PidFile of this process: a second fd would "succeed" (POSIX locks merge
            # within a process) and closing either would silently drop the lock.
            raise AlreadyRunning(os.getpid(), self.path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o755, exist_ok=True)
        for _attempt in range(_LOCK_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                _lock_exclusive(fd)
            except OSError as exc:
                pid = _read_pid_fd(fd) if _is_locked_error(exc) else None
                os.close(fd)  # we hold no lock on it, so this releases nothing of anyone's
                if not _is_locked_error(exc):
                    raise
                raise AlreadyRunning(self._wait_for_pid(pid), self.path) from None
            # The previous holder unlinks the file on release: if it did so between our open
            # and our lock we hold a lock on a deleted inode, and a third process could create
            # and lock a new file at the same path. Only the inode at the path counts.
            info = os.fstat(fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (
                info.st_dev,
                info.st_ino,
            ):
                break
            os.close(fd)
        else:
            raise OSError(errno.EAGAIN, "pidfile keeps being replaced while locking it", self.path)
        pid = os.getpid()
        # World-readable whatever the umask (UMask=0027 under systemd): `workerpool status` and
        # `stop` run by an operator must read it, and a pid is no secret.
        with contextlib.suppress(OSError):  # not our file (left by root): its mode stays
            os.fchmod(fd, 0o644)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{pid}\n".encode("ascii"), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._pid = fd, pid
        _held[(info.st_dev, info.st_ino)] = pid

    def _wait_for_pid(self, pid: int | None) -> int | None:
        # Locked but empty: the holder is between lockf and write. Read again briefly.
        attempts = _PID_READ_ATTEMPTS
        while pid is None and attempts:
            attempts -= 1
            time.sleep(0.01)
            try:
                with open(self.path, "rb") as handle:
                    pid = _parse_pid(handle.read(64))
            except OSError:
                break
        return pid

    def release(self) -> None:
        """Unlink the file (if it still holds our pid) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            info = os.fstat(fd)
        except OSError:  # closed behind our back (a child closing every fd): nothing to release
            self._pid = None
            return
        key = (info.st_dev, info.st_ino)
        if self._pid == os.getpid():
            # Unlink before closing, while still locked, so nobody can lock it in between.
            # A forked worker (different pid) only closes its inherited copy: it holds no lock
            # and the file is not its to remove.
            try:
                current = os.stat(self.path)
                if (current.st_dev, current.st_ino) == key and _read_pid_fd(fd) == self._pid:
                    os.unlink(self.path)
            except OSError:
                pass  # already gone, or the directory is no longer writable: the lock still goes
        if _held.get(key) == os.getpid():
            del _held[key]
        self._pid = None
        os.close(fd)

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def pidfile_state(path: str) -> tuple[str, int | None]:
    """("running", pid), ("stale", pid) or ("absent", None) for the pidfile at `path`."""
    if _held_here(path):
        return "running", os.getpid()  # opening it here would drop our own lock
    try:
        # Read-only with a shared lock: enough to test, and works for any user who can read it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "absent", None
    except PermissionError:
        return _state_from_pid(path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "stale", None  # a directory or device: acquire() will say what is wrong
        pid = _read_pid_fd(fd)
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if not _is_locked_error(exc):
                raise
            locked = True
        else:
            locked = False
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    if not locked:
        return "stale", pid
    if pid is None:
        pid = PidFile(path)._wait_for_pid(None)
    if pid is None:
        return "running", None  # locked, so someone is alive, though it has not said who yet
    return ("running", pid) if _alive(pid) else ("stale", pid)


def _state_from_pid(path: str) -> tuple[str, int | None]:
    # Unreadable for lock testing (no read permission): fall back to the pid, best effort.
    try:
        with open(path, "rb") as handle:
            pid = _parse_pid(handle.read(64))
    except OSError:
        return "stale", None
    return ("running", pid) if _alive(pid) else ("stale", pid)


def status_path(pidfile: str) -> str:
    """The supervisor's JSON status file beside the pidfile (x.pid -> x.status.json)."""
    if pidfile.endswith(".pid"):
        return pidfile[: -len(".pid")] + ".status.json"
    return pidfile + ".status.json"


def write_json_atomic(path: str, data: dict, *, durable: bool = False) -> None:
    """Write `data` as JSON to `path` so readers see the old or the new file, never a mix.

    The status file is rewritten every tick and is worthless after a crash, so it is not
    fsynced unless `durable` is set.
    """
    directory = os.path.dirname(os.path.abspath(path))
    payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8") + b"\n"
    while True:
        temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            # os.open rather than mkstemp: 0644 filtered by the umask (UMask= under systemd),
            # not mkstemp's fixed 0600, so `workerpool status` as another user can read it.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None if it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resolve_user(user: str, group: str) -> tuple[int | None, int | None]:
    """(uid, gid) for the `user` and `group` settings (names or numbers; empty = unchanged).

    The group defaults to the user's primary group.
    """
    user, group = user.strip(), group.strip()
    uid: int | None = None
    gid: int | None = None
    primary: int | None = None
    if user:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit():
                raise ConfigError(
                    f"user = {user!r}: no such user (expected a user name or a numeric uid)"
                ) from None
            uid = int(user)  # a bare uid without a passwd entry is valid for setuid
        else:
            uid, primary = entry.pw_uid, entry.pw_gid
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(
                    f"group = {group!r}: no such group (expected a group name or a numeric gid)"
                ) from None
    elif uid is not None:
        if primary is None:
            raise ConfigError(
                f"user = {user!r}: uid has no passwd entry, so no primary group: set group too"
            )
        gid = primary
    return uid, gid


def _switch_groups(uid: int | None, gid: int | None) -> int:
    """Set the supplementary groups for uid/gid (as root) and return the gid to switch to."""
    name: str | None = None
    if uid is not None:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            pass
        else:
            name = entry.pw_name
            if gid is None:
                gid = entry.pw_gid
    if gid is None:
        raise ValueError(f"cannot switch to uid {uid}: no group given and no passwd entry")
    # Root's supplementary groups (root, often more) would otherwise survive setuid: take the
    # user's own, as systemd's User= and login(1) do.
    if name is not None:
        os.initgroups(name, gid)
    else:
        os.setgroups([gid])
    return gid


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Switch to `uid`/`gid` (supplementary groups first) when running as root; else no-op."""
    if os.geteuid() != 0 or (uid is None and gid is None):
        return
    os.setgid(_switch_groups(uid, gid))
    if uid is not None:
        os.setuid(uid)
        if uid != 0 and (os.geteuid() == 0 or os.getuid() == 0):
            raise PermissionError(f"setuid({uid}) left the process with root privileges")


def daemonize(
    pidfile: PidFile,
    *,
    uid: int | None = None,
    gid: int | None = None,
    files_preserve: list | None = None,
    working_directory: str = "/",
) -> python_daemon.DaemonContext:
    """Detach into the background, switch user, lock the pidfile; return the open context.

    Runs in the calling process up to the fork: a pool already running raises AlreadyRunning
    here, where the operator sees it (after the fork stderr is /dev/null). The user switch
    (as root only) comes after the chdir, so a working directory only root may enter works.
    Everything else (logging, the supervisor) is the caller's.
    """
    state, pid = pidfile_state(pidfile.path)
    if state == "running":
        raise AlreadyRunning(pid, pidfile.path)
    options: dict[str, Any] = {}
    if os.geteuid() == 0 and (uid is not None or gid is not None):
        # python-daemon switches with setgid + setuid only, keeping root's supplementary
        # groups (its initgroups option skips setgid instead): set the groups here, and the
        # gid too when only a uid is given.
        options["gid"] = _switch_groups(uid, gid)
        if uid is not None:
            options["uid"] = uid
    context = python_daemon.DaemonContext(
        pidfile=pidfile,
        umask=0o022,
        working_directory=working_directory,
        detach_process=True,
        # A copy: python-daemon appends the std streams to the list it is given.
        files_preserve=list(files_preserve or []),
        # Empty: python-daemon's default map turns SIGTERM into SystemExit at any point; the
        # supervisor installs its own handlers (drain on TERM).
        signal_map={},
        **options,
    )
    context.open()
    return context


def _dedicated(directory: str, stems: set[str]) -> bool:
    # A directory may be chowned to the service user only if it is workerpool's own (empty, or
    # holding only our pid/status/log files): never /run, /var/log or /tmp.
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return all(any(name.lstrip(".").startswith(stem) for stem in stems) for name in names)


def _chown(path: str, uid: int | None, gid: int | None) -> None:
    # lchown: never follow a symlink planted where we expect our own file.
    os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)


def prepare_paths(pidfile: str, log_file: str, uid: int | None, gid: int | None) -> None:
    """Create the pidfile's and log file's directories; as root, hand them to uid/gid."""
    as_root = os.geteuid() == 0 and (uid is not None or gid is not None)
    files = [path for path in (pidfile, log_file) if path]
    stems = {os.path.splitext(os.path.basename(path))[0] for path in files}
    for path in files:
        directory = os.path.dirname(os.path.abspath(path))
        existed = os.path.isdir(directory)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if not as_root:
            continue
        if not existed or _dedicated(directory, stems):
            _chown(directory, uid, gid)
        if os.path.isfile(path) and not os.path.islink(path):
            # A log (or stale pidfile) left by an earlier run as root: the user must write it.
            _chown(path, uid, gid)


def check_pidfile_writable(path: str, uid: int | None = None, gid: int | None = None) -> None:
    """Raise OSError unless the pidfile can be opened for writing (created if missing).

    For the parent of a daemon, whose child locks the pidfile after the fork where nobody
    sees a failure. Takes no lock; closing the descriptor drops none (this process holds none
    on it). A file created here as root for a user switch is handed to that user.
    """
    existed = os.path.lexists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        if not existed and os.geteuid() == 0 and (uid is not None or gid is not None):
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
    finally:
        os.close(fd)


def wait_for_exit(
    pid: int,
    timeout: float,
    poll: float = 0.1,
    on_tick: Callable[[], None] | None = None,
) -> bool:
    """Poll until `pid` has exited (a zombie counts as exited); True if it did within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if not _alive(pid):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if on_tick is not None:
            on_tick()
        time.sleep(min(poll, remaining))
