"""The sd_notify protocol (readiness, status, watchdog pings) without libsystemd.

Stdlib only: the supervisor imports it before forking and it must cost nothing when the
pool does not run under systemd (NOTIFY_SOCKET unset).
"""

from __future__ import annotations

import os
import socket

_sock: socket.socket | None = None
# The (st_dev, st_ino) of our socket when created: python-daemon closes every descriptor it
# does not know about, and the number may then be reused by another file (the pidfile). We
# must notice that instead of sending to, or closing, a descriptor that is no longer ours.
_sock_identity: tuple[int, int] | None = None


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock: and other transports are not supported here


def _forget() -> None:
    global _sock, _sock_identity
    if _sock is not None:
        try:
            current = os.fstat(_sock.fileno())
            still_ours = (current.st_dev, current.st_ino) == _sock_identity
        except (OSError, ValueError):
            still_ours = False
        if still_ours:
            _sock.close()
        else:
            _sock.detach()  # the number now belongs to someone else: never close it
    _sock = None
    _sock_identity = None


def _socket() -> socket.socket:
    global _sock, _sock_identity
    if _sock is not None:
        try:
            current = os.fstat(_sock.fileno())
            if (current.st_dev, current.st_ino) == _sock_identity:
                return _sock
        except (OSError, ValueError):
            pass
        _forget()
    # Unconnected, so one socket serves whatever address $NOTIFY_SOCKET names at send time.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    info = os.fstat(sock.fileno())
    _sock, _sock_identity = sock, (info.st_dev, info.st_ino)
    return sock


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to $NOTIFY_SOCKET; False if unset or on any OSError."""
    address = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        _socket().sendto(message.encode("utf-8"), address)
    except OSError:
        _forget()  # a fresh socket next time, in case this one is what broke
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None if not asked for."""
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process (we are a fork, or a child of the main)
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends, so one late tick is not fatal.
    return usec / 2 / 1_000_000
