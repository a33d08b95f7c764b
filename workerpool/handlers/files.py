"""The `file_process` task type: checksum, gzip or move a file confined to base_dir."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from workerpool.config import Config
from workerpool.errors import TaskRejected

# The package's logger: records keep the name they had before the split.
log = logging.getLogger("workerpool.handlers")

CHUNK = 1024 * 1024
# link() fails with these where a copy still works: across mounts, on filesystems without
# hard links, or under fs.protected_hardlinks.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}


# --- file_process
#
# Task paths are untrusted, and the tree under base_dir may change while a task runs. A path
# string checked once and then used again can lead elsewhere the second time: a directory swapped
# for a symlink in between is followed (O_NOFOLLOW guards only the last component). So each file
# and directory is opened once, the open descriptor is checked (the kernel says where it really
# is, in /proc/self/fd), and later work goes through it: reads from the open file; creating,
# linking and unlinking names relative to an open directory.

# O_NONBLOCK: opening a FIFO swapped in for the file must not wait for a writer.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _base_dir(config: Config) -> str:
    base = os.path.realpath(config.file_process_base_dir)
    if not os.path.isdir(base):
        # An unmounted volume may come back: retry rather than dead-letter.
        raise FileNotFoundError(errno.ENOENT, "[file_process] base_dir is not a directory", base)
    return base


def _inside(root: str, path: str) -> bool:
    return os.path.isabs(path) and os.path.commonpath([root, path]) == root


def _confine(base: str, value: Any, field: str) -> str:
    """The real path of `value` (relative to base), rejected unless it stays inside base."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise TaskRejected(f"file_process task: {field} must be a non-empty string")
    if os.path.isabs(value):
        raise TaskRejected(f"file_process task: {field} {value!r} must be relative to base_dir")
    real = os.path.realpath(os.path.join(base, value))
    if not _inside(base, real):
        raise TaskRejected(f"file_process task: {field} {value!r} is outside base_dir")
    return real


def _fd_path(fd: int) -> str:
    """Where an open file or directory really is, whatever path string led to it."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        raise OSError(errno.ENOENT, "file_process needs /proc to check paths") from None


def _same_file(one: os.stat_result, other: os.stat_result) -> bool:
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


@contextlib.contextmanager
def _directory(root: str, path: str, what: str) -> Iterator[int]:
    """Directory `path` opened, rejected unless the opened directory is inside root."""
    fd = os.open(path, _OPEN_DIR)
    try:
        if not _inside(root, _fd_path(fd)):
            raise TaskRejected(f"file_process task: {what}")
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _source(base: str, data: dict) -> Iterator[tuple[str, BinaryIO, os.stat_result]]:
    """The task's `path` opened for reading: its real path, the open file and its fstat()."""
    path = data.get("path")
    real = _confine(base, path, "path")
    try:
        fd = os.open(real, _OPEN_FILE)
    except (FileNotFoundError, NotADirectoryError):
        raise TaskRejected(f"file_process task: no such file {path!r} under base_dir") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # realpath() resolved every symlink: this one is new
            raise TaskRejected(f"file_process task: {path!r} became a symlink") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise TaskRejected(f"file_process task: {path!r} is not a regular file") from None
        raise
    try:
        info = os.fstat(fd)  # of what was opened, not of what the path names now
        if stat.S_ISDIR(info.st_mode):
            raise TaskRejected(f"file_process task: {path!r} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise TaskRejected(f"file_process task: {path!r} is not a regular file")
        # The open followed whatever the parent directories were by then: see where it led.
        if not _inside(base, _fd_path(fd)):
            raise TaskRejected(f"file_process task: path {path!r} is outside base_dir")
        os.set_blocking(fd, True)
        source = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with source:
        yield real, source, info


def _sha256(fd: int) -> str:
    """The SHA-256 of an open file's content (pread(): the file offset stays where it was)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _output_path(config: Config, base: str, real: str, suffix: str) -> tuple[str, str]:
    """Where the result of `real` goes (beside it, or mirrored under output_dir), and the
    directory it must stay inside."""
    setting = config.file_process_output_dir
    if not setting:
        return base, real + suffix
    out = os.path.realpath(os.path.join(base, setting))
    # A relative output_dir lives in base_dir; an absolute one is the operator's own choice.
    root = out if os.path.isabs(setting) else base
    if not _inside(root, out):
        raise TaskRejected(f"[file_process] output_dir {setting!r} is outside base_dir")
    target = os.path.join(out, os.path.relpath(real, base) + suffix)
    # realpath() resolves the existing part: a symlinked subdirectory cannot lead out. (Nor can
    # one swapped in later: _write_atomic() checks the directory it opens.)
    if not _inside(out, os.path.realpath(os.path.dirname(target))):
        raise TaskRejected(f"file_process task: output {target!r} is outside output_dir")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    return out, target


def _temporary(dir_fd: int, name: str) -> tuple[str, BinaryIO]:
    """A new hidden file beside `name` in directory dir_fd, open for writing."""
    while True:
        temporary = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
        except FileExistsError:
            continue
        return temporary, os.fdopen(fd, "wb")


def _write_atomic(root: str, target: str, mode: int, write: Callable[[BinaryIO], Any]) -> None:
    """Write `target` (inside root) through a temporary file: readers never see half a result."""
    directory, name = os.path.split(target)
    with _directory(root, directory, f"output {target!r} is outside {root!r}") as dir_fd:
        temporary, out = _temporary(dir_fd, name)
        try:
            with out:
                write(out)
                out.flush()
                os.fchmod(out.fileno(), stat.S_IMODE(mode) & 0o666)
                os.fsync(out.fileno())
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise


def _sha256sum_line(digest: str, name: str) -> bytes:
    """One line in `sha256sum` format, escaping names the way coreutils does."""
    raw = os.fsencode(name)
    if any(byte in raw for byte in b"\\\n\r"):
        raw = raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\" + digest.encode() + b"  " + raw + b"\n"
    return digest.encode() + b"  " + raw + b"\n"


def _checksum(config: Config, base: str, data: dict) -> None:
    with _source(base, data) as (real, source, info):
        digest = _sha256(source.fileno())
    root, target = _output_path(config, base, real, ".sha256")
    line = _sha256sum_line(digest, os.path.basename(real))
    _write_atomic(root, target, info.st_mode, lambda out: out.write(line))
    log.info("sha256 %s  %r", digest, data["path"])


def _gzip(config: Config, base: str, data: dict) -> None:
    with _source(base, data) as (real, source, info):
        root, target = _output_path(config, base, real, ".gz")

        def write(out: BinaryIO) -> None:
            with gzip.GzipFile(os.path.basename(real), "wb", fileobj=out,
                               mtime=int(info.st_mtime)) as compressed:
                shutil.copyfileobj(source, compressed, CHUNK)

        _write_atomic(root, target, info.st_mode, write)
    log.info("gzipped %r to %r", data["path"], target)


def _move(config: Config, base: str, data: dict) -> None:
    path, dest_value = data.get("path"), data.get("dest")
    with _source(base, data) as (real, source, info):
        dest = _confine(base, dest_value, "dest")
        (directory, name), (dest_directory, dest_name) = os.path.split(real), os.path.split(dest)
        try:
            os.makedirs(dest_directory, exist_ok=True)
            with (_directory(base, directory, f"path {path!r} is outside base_dir") as src_fd,
                  _directory(base, dest_directory,
                             f"dest {dest_value!r} is outside base_dir") as dest_fd):
                if name == dest_name and _same_file(os.fstat(src_fd), os.fstat(dest_fd)):
                    raise FileExistsError  # dest is path itself: "finishing" would delete it
                if not _holds(dest_fd, dest_name, source, info):
                    _link_or_copy(source, info, src_fd, name, dest_fd, dest_name, path)
                removed = _unlink_if_same(src_fd, name, info)
        except (FileExistsError, NotADirectoryError):
            raise TaskRejected(f"file_process task: dest {dest_value!r} already exists "
                               "(or a file is in its way)") from None
    if removed:
        log.info("moved %r to %r", path, dest_value)
    else:
        log.warning("moved %r to %r, but path now names another file: left that", path,
                    dest_value)


def _holds(dir_fd: int, name: str, source: BinaryIO, info: os.stat_result) -> bool:
    """Whether `name` already holds source's content: an earlier delivery of this task made it,
    then died before removing the source (if it linked: the same file; if it copied: the same
    bytes)."""
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    except OSError:
        return False  # nothing there, or nothing to compare (a symlink): link() will tell
    try:
        there = os.fstat(fd)
        if _same_file(there, info):
            return True
        return (stat.S_ISREG(there.st_mode) and there.st_size == info.st_size
                and _sha256(fd) == _sha256(source.fileno()))
    finally:
        os.close(fd)


def _unlink_if_same(dir_fd: int, name: str, info: os.stat_result) -> bool:
    """Remove `name` if it still names the file `info` describes; a file put there since stays."""
    try:
        if not _same_file(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), info):
            return False
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:  # gone already: what matters is that it is not left behind
        pass
    return True


def _link_or_copy(source: BinaryIO, info: os.stat_result, src_fd: int, name: str, dest_fd: int,
                  dest_name: str, path: str) -> None:
    """Make dest hold source's content; unlike rename(), never replace an existing dest."""
    try:
        # follow_symlinks=False: a symlink swapped in for the source is linked as itself.
        os.link(name, dest_name, src_dir_fd=src_fd, dst_dir_fd=dest_fd, follow_symlinks=False)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in _NO_LINK:
            raise
        _copy(source, info, dest_fd, dest_name)
        return
    if not _same_file(os.stat(dest_name, dir_fd=dest_fd, follow_symlinks=False), info):
        # Another file (or a symlink) took the source's name after the checks: take it back.
        os.unlink(dest_name, dir_fd=dest_fd)
        raise TaskRejected(f"file_process task: {path!r} was replaced while being moved")


def _copy(source: BinaryIO, info: os.stat_result, dir_fd: int, name: str) -> None:
    """Copy source to `name` through a temporary file: a worker killed while copying leaves no
    partial dest behind (only a hidden .tmp file), so the redelivery can copy again."""
    temporary, out = _temporary(dir_fd, name)
    try:
        with out:
            source.seek(0)
            shutil.copyfileobj(source, out, CHUNK)
            out.flush()
            os.fchmod(out.fileno(), stat.S_IMODE(info.st_mode))
            os.utime(out.fileno(), ns=(info.st_atime_ns, info.st_mtime_ns))
            os.fsync(out.fileno())
        try:
            os.link(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if isinstance(exc, FileExistsError) or exc.errno not in _NO_LINK:
                raise
            # No hard links at all on this filesystem. rename() replaces an existing dest, so
            # look first: only a dest made in the instant between can be lost.
            try:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), name) from None
    finally:
        with contextlib.suppress(OSError):  # gone already after rename()
            os.unlink(temporary, dir_fd=dir_fd)
    os.fsync(dir_fd)  # the new name, too, survives a crash


OPERATIONS: dict[str, Callable[[Config, str, dict], None]] = {
    "checksum": _checksum, "gzip": _gzip, "move": _move,
}


def _run_file_operation(config: Config, operation: str, data: dict) -> None:
    OPERATIONS[operation](config, _base_dir(config), data)


async def process_file(config: Config, data: dict) -> None:
    """Run a file_process task's operation on a file under [file_process] base_dir."""
    operation = data.get("operation", "checksum")
    # %r: the path is untrusted and unchecked yet; a newline in it must not forge a log line.
    log.info("file_process task: %r %r", operation, data.get("path"))
    if not config.file_process_base_dir:
        raise TaskRejected("file_process is disabled: set [file_process] base_dir")
    if not isinstance(operation, str) or operation not in OPERATIONS:
        raise TaskRejected(f"file_process task: unknown operation {operation!r}; expected one "
                           f"of {', '.join(OPERATIONS)}")
    # Even realpath() may block (a hung network mount): all file work runs in a thread.
    await asyncio.to_thread(_run_file_operation, config, operation, data)
