"""Shared fixtures: a private Redis server per session (flushed per test) and helpers."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a clean database on the session's private server."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: RedisServer, redis_url: str):
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def make_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Dedicated servers (for restarts and persistence); every one is stopped at the end."""
    servers: list[RedisServer] = []

    def make(**kwargs: object) -> RedisServer:
        server = RedisServer(**kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def write_config(tmp_path) -> Callable[..., str]:
    """Write an INI file with a [workerpool] section (and others) and return its path."""

    def write(settings: dict[str, object] | None = None, **sections: dict[str, object]) -> str:
        lines = ["[workerpool]"]
        for key, value in (settings or {}).items():
            lines.append(f"{key} = {value}")
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {value}" for key, value in values.items()]
        path = tmp_path / "workerpool.ini"
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    return write


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, step: float = 0.02) -> object:
    """Poll until predicate() is truthy; fail the test with a clear message on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(step)


class ProcessReaper:
    """Remember every pid a test starts and kill the survivors at the end, by pid.

    A pid is remembered with its process's start time (field 22 of /proc/PID/stat): at the
    end only a process still alive with that same start time is killed, never another one
    that was given the pid after ours exited.
    """

    def __init__(self) -> None:
        self.pids: dict[int, int | None] = {}

    def add(self, pid: int) -> int:
        self.pids[pid] = _start_time(pid)
        return pid

    def kill_all(self) -> None:
        for pid, started in self.pids.items():
            if started is None or _start_time(pid) != started:
                continue  # gone (or was already gone when added), or the pid is another's now
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, None if it has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name in parentheses may hold spaces: fields count from the last ')'.
    fields = data[data.rfind(b")") + 1 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22 overall; fields[0] is field 3 (the state)


@pytest.fixture
def reaper() -> Iterator[ProcessReaper]:
    tracker = ProcessReaper()
    yield tracker
    tracker.kill_all()


def refuse_writes(client) -> None:
    """Make a noeviction server refuse every write for lack of memory (OOM), until
    `CONFIG SET maxmemory 0`. (Filling memory up to a limit is not steady: the server's own
    buffers come and go, and a write may slip under the limit.)"""
    import redis

    client.config_set("maxmemory", 1)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("refused", b"x")


def alive(pid: int) -> bool:
    """Running (a zombie, which nobody may reap in a container, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 1:].split()[0] not in (b"Z", b"X")


def children(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 1:].split()
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            found.add(int(entry))
    return found
