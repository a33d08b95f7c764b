"""Redis clients built from the config: standalone URL (redis, rediss, unix), Sentinel or Cluster.

redis-py's own retries are turned off: a lost reply to a take or an ack must be seen by the
worker, which reconciles its processing list, rather than replayed blindly by the client.

Failover rule, for Sentinel: a client never moves to a new master silently. redis-py would
switch an idle connection over without a word, and a worker would then run one half of its
protocol against the old master and the other half against the new one, leaving tasks stuck
in its processing list there. Here every change of master surfaces once, as a
ConnectionError, *before* a command runs on the new master; the worker and the supervisor
already answer a ConnectionError by reconnecting and reconciling their processing lists. A
change is noticed (a) when a write is refused because the server is now a replica (READONLY)
or has lost its replicas (NOREPLICAS, with min-replicas-to-write) or a blocked command was
kicked out by a role change (UNBLOCKED), and (b) by asking the Sentinels again at most every
MASTER_CHECK_PERIOD seconds, which bounds how long a client keeps writing to a demoted master
that nobody has reconfigured yet.

For Cluster, redis-py follows MOVED redirections itself (a MOVED reply means nothing ran, so
that is safe); its cluster-only exceptions that are not RedisError (RedisClusterException,
raised when no node answers) are turned into ConnectionError so that the pool's error
handling sees every Redis failure the same way.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisClusterException, ResponseError

from workerpool.config import Config, mask_url

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
# Room above the longest blocking call so a blocking pop never trips the socket timeout.
_BLOCKING_MARGIN = 5.0
COMMAND_TIMEOUT = 10.0
SENTINEL_TIMEOUT = 2.0  # a Sentinel query is tiny: do not wait long for a silent Sentinel
# How often a Sentinel-managed client asks the Sentinels whether the master moved.
MASTER_CHECK_PERIOD = 1.0
# Replies meaning "this server is no longer the master you want": reconnect through Sentinel.
_DEMOTED_PREFIXES = ("NOREPLICAS", "UNBLOCKED", "MASTERDOWN")


class MasterChanged(ConnectionError):
    """Sentinel names another master than the one this client was using."""


def redis_url(config: Config) -> str:
    """The URL clients connect to (the embedded server's socket when redis_url = embedded)."""
    if config.redis_url == "embedded":
        from workerpool.embedded import socket_path

        return "unix://" + socket_path(config)
    return config.redis_url


def describe(config: Config) -> str:
    """Where the pool's Redis is, for logs and status: never a password."""
    if config.redis_mode == "sentinel":
        sentinels = ",".join(f"{host}:{port}" for host, port in config.sentinels)
        return f"sentinel master {config.sentinel_master!r} via {sentinels}"
    if config.redis_mode == "cluster":
        return f"cluster via {mask_url(config.redis_url)}"
    return mask_url(config.redis_url)


def uses_tls(config: Config) -> bool:
    """rediss://; in sentinel and cluster mode (whose URL host is not where Redis is) a CA or a
    client certificate is enough."""
    if config.redis_url.startswith("rediss:"):
        return True
    return config.redis_mode != "standalone" and bool(config.ssl_ca_certs or config.ssl_certfile)


def _tls_kwargs(config: Config) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[config.ssl_cert_reqs]}
    if config.ssl_ca_certs:
        kwargs["ssl_ca_certs"] = config.ssl_ca_certs
    if config.ssl_certfile:
        kwargs["ssl_certfile"] = config.ssl_certfile
    if config.ssl_keyfile:
        kwargs["ssl_keyfile"] = config.ssl_keyfile
    return kwargs


def _client_kwargs(config: Config, socket_timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(socket_timeout, COMMAND_TIMEOUT),
        "health_check_interval": 0,
    }
    password = config.redis_password
    if password:
        kwargs["password"] = password
    if uses_tls(config):
        kwargs.update(_tls_kwargs(config))
    return kwargs


def _url(config: Config) -> str:
    """The URL for from_url(): rediss:// when TLS is on; without its password when one comes
    from the environment or password_file (redis-py lets URL values win over keyword
    arguments)."""
    url = redis_url(config)
    if url.startswith("redis:") and uses_tls(config):  # a cluster with ssl_* set
        url = "rediss:" + url[len("redis:"):]
    if not config.redis_password:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=(user + "@" if user else "") + hostport))


def _sentinel_kwargs(config: Config, retry: Any) -> dict[str, Any]:
    # One quick try per Sentinel: the next one is asked at once, and the caller (worker,
    # supervisor) has its own backoff. redis-py would retry each (also a wrong password).
    kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT,
                              "socket_connect_timeout": SENTINEL_TIMEOUT, "retry": retry}
    if config.sentinel_username:
        kwargs["username"] = config.sentinel_username
    if config.sentinel_password:
        kwargs["password"] = config.sentinel_password
    if uses_tls(config):  # TLS to the Sentinels as well as to the data nodes
        kwargs["ssl"] = True
        kwargs.update(_tls_kwargs(config))
    return kwargs


def _db_kwargs(config: Config) -> dict[str, Any]:
    """What a Sentinel-managed client takes from redis_url: database, username, password."""
    parts = urlsplit(config.redis_url)
    kwargs: dict[str, Any] = {}
    db = parts.path.lstrip("/")
    if db.isdigit():
        kwargs["db"] = int(db)
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password and not config.redis_password:
        kwargs["password"] = unquote(parts.password)
    return kwargs


def _demoted(exc: ResponseError) -> bool:
    return str(exc).startswith(_DEMOTED_PREFIXES)


def _changed(previous: Any, address: Any) -> MasterChanged:
    return MasterChanged(f"Sentinel moved the master from {_address(previous)} to "
                         f"{_address(address)}; reconnecting")


def _address(address: Any) -> str:
    host, port = address
    return f"{host.decode() if isinstance(host, bytes) else host}:{port}"


# --- Sentinel, synchronous


def _master_address(address: Any) -> tuple[str, int] | None:
    if not address:
        return None
    host, port = address
    return (host.decode() if isinstance(host, bytes) else host), int(port)


class _Sentinel(redis.Sentinel):
    """Asks SENTINEL GET-MASTER-ADDR-BY-NAME, which names the promoted replica as soon as it
    is a master; redis-py's SENTINEL MASTERS keeps naming the old master until every other
    replica has been reconfigured, seconds later, while the old one may refuse writes."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        for index, sentinel in enumerate(self.sentinels):
            try:
                address = _master_address(sentinel.sentinel_get_master_addr_by_name(
                    service_name))
            except (ConnectionError, redis.TimeoutError) as exc:
                errors.append(f"{_node(sentinel)}: {exc}")
                continue
            if address is not None:
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                return address
            errors.append(f"{_node(sentinel)}: does not know {service_name!r}")
        raise redis.sentinel.MasterNotFoundError(
            f"no Sentinel names a master for {service_name!r} ({'; '.join(errors)})")


def _node(client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"



class _SentinelConnection(redis.sentinel.SentinelManagedConnection):
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if self.connection_pool.is_master and _demoted(exc):
                self.disconnect()
                raise ConnectionError(f"{self.host}:{self.port} refused a write ({exc}); "
                                      "asking Sentinel for the master again") from exc
            raise


class _SentinelSSLConnection(_SentinelConnection, redis.connection.SSLConnection):
    pass


class _SentinelProxy(redis.sentinel.SentinelConnectionPoolProxy):
    def get_master_address(self) -> Any:
        previous = self.master_address
        address = super().get_master_address()  # closes idle connections when it moved
        if self.is_master and previous is not None and address != previous:
            raise _changed(previous, address)
        return address


class _SentinelPool(redis.sentinel.SentinelConnectionPool):
    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        tls = kwargs.pop("ssl", False)
        kwargs["connection_class"] = _SentinelSSLConnection if tls else _SentinelConnection
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.proxy = _SentinelProxy(
            connection_pool=self, is_master=self.is_master,
            check_connection=self.check_connection, service_name=service_name,
            sentinel_manager=sentinel_manager)
        self.connection_kwargs["connection_pool"] = self.proxy
        self._next_check = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if self.is_master and self.master_address is not None and now >= self._next_check:
            self._next_check = now + MASTER_CHECK_PERIOD
            try:
                self.get_master_address()
            except MasterChanged:
                raise
            except (ConnectionError, redis.TimeoutError):
                pass  # no Sentinel answers: keep the master we have
        return super().get_connection(*args, **kwargs)


# --- Sentinel, asyncio


class _AsyncSentinel(redis.asyncio.Sentinel):
    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        for index, sentinel in enumerate(self.sentinels):
            try:
                address = _master_address(await sentinel.sentinel_get_master_addr_by_name(
                    service_name))
            except (ConnectionError, redis.TimeoutError) as exc:
                errors.append(f"{_node(sentinel)}: {exc}")
                continue
            if address is not None:
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                return address
            errors.append(f"{_node(sentinel)}: does not know {service_name!r}")
        raise redis.asyncio.sentinel.MasterNotFoundError(
            f"no Sentinel names a master for {service_name!r} ({'; '.join(errors)})")



class _AsyncSentinelConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if self.connection_pool.is_master and _demoted(exc):
                await self.disconnect()
                raise ConnectionError(f"{self.host}:{self.port} refused a write ({exc}); "
                                      "asking Sentinel for the master again") from exc
            raise


class _AsyncSentinelSSLConnection(_AsyncSentinelConnection, redis.asyncio.SSLConnection):
    pass


class _AsyncSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool):
    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        tls = kwargs.pop("ssl", False)
        kwargs["connection_class"] = _AsyncSentinelSSLConnection if tls else (
            _AsyncSentinelConnection)
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._next_check = 0.0

    async def get_master_address(self) -> Any:
        previous = self.master_address
        address = await super().get_master_address()  # closes idle connections when it moved
        if self.is_master and previous is not None and address != previous:
            raise _changed(previous, address)
        return address

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if self.is_master and self.master_address is not None and now >= self._next_check:
            self._next_check = now + MASTER_CHECK_PERIOD
            try:
                await self.get_master_address()
            except MasterChanged:
                raise
            except (ConnectionError, redis.TimeoutError):
                pass
        return await super().get_connection(*args, **kwargs)

    async def release(self, connection: Any) -> None:
        # redis-py's asyncio pool (unlike the sync one) takes back a connection to a former
        # master as it is, and would hand it out again: close it first.
        master = self.master_address
        if self.is_master and master is not None and (
                connection.host, connection.port) != tuple(master):
            await connection.disconnect()
        await super().release(connection)


# --- Cluster: every failure a RedisError


@contextlib.contextmanager
def _cluster_errors() -> Iterator[None]:
    try:
        yield
    except RedisClusterException as exc:
        raise ConnectionError(f"redis cluster unavailable: {exc}") from exc


class _Cluster(redis.RedisCluster):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _cluster_errors():
            super().__init__(*args, **kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _cluster_errors():
            return super().execute_command(*args, **kwargs)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = super().pipeline(*args, **kwargs)
        execute = pipe.execute

        def guarded(*a: Any, **kw: Any) -> Any:
            with _cluster_errors():
                return execute(*a, **kw)

        pipe.execute = guarded
        return pipe


class _AsyncCluster(redis.asyncio.RedisCluster):
    async def initialize(self, *args: Any, **kwargs: Any) -> Any:
        with _cluster_errors():
            return await super().initialize(*args, **kwargs)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _cluster_errors():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = super().pipeline(*args, **kwargs)
        execute = pipe.execute

        async def guarded(*a: Any, **kw: Any) -> Any:
            with _cluster_errors():
                return await execute(*a, **kw)

        pipe.execute = guarded
        return pipe


# --- WAIT on the connection that wrote


# Each WAIT blocks at most this long (WAIT 0 would block forever), well under socket timeouts.
WAIT_STEP = 1.0


def push_and_wait(client: Any, key: str, batches: list[list[bytes]], replicas: int,
                  timeout: float) -> tuple[int, int]:
    """LPUSH the batches to `key`, then WAIT until `replicas` replicas hold them or `timeout`
    seconds pass; returns (pushed, replicas that acknowledged).

    WAIT counts the replicas that have the writes of *its own connection*, so both go over one
    connection, taken from the pool by hand, to the server that holds `key`: on a Cluster the
    master of the key's slot (redis-py would send a bare WAIT to every primary and add the
    answers up). A MOVED reply to the first push (the slot changed hands in a failover)
    refreshes the slot map and tries once more.
    """
    for attempt in range(2):
        node = _key_client(client, key)
        pool = node.connection_pool
        connection = _pool_connection(pool)
        pushed = 0
        try:
            for batch in batches:
                connection.send_command("LPUSH", key, *batch)
                node.parse_response(connection, "LPUSH")
                pushed += len(batch)
            deadline = time.monotonic() + timeout
            while True:
                step = max(1, int(min(WAIT_STEP, deadline - time.monotonic()) * 1000))
                connection.send_command("WAIT", replicas, step)
                acknowledged = int(node.parse_response(connection, "WAIT"))
                if acknowledged >= replicas or time.monotonic() >= deadline:
                    return pushed, acknowledged
        except redis.exceptions.MovedError:
            if pushed or attempt:
                raise
            with _cluster_errors():
                client.nodes_manager.initialize()
        except BaseException as exc:
            if not isinstance(exc, ResponseError):
                connection.disconnect()  # a reply may be left unread
            raise
        finally:
            pool.release(connection)
    raise AssertionError("unreachable")


def _key_client(client: Any, key: str) -> Any:
    if isinstance(client, redis.RedisCluster):
        with _cluster_errors():
            return client.get_redis_connection(client.get_node_from_key(key))
    return client


def _pool_connection(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("LPUSH")


async def push_and_wait_async(client: Any, key: str, batches: list[list[bytes]], replicas: int,
                              timeout: float) -> tuple[int, int]:
    """push_and_wait() for an asyncio client."""
    for attempt in range(2):
        pushed = 0
        if isinstance(client, redis.asyncio.RedisCluster):
            with _cluster_errors():
                await client.initialize()
                node = client.get_node_from_key(key)
            connection = node.acquire_connection()
            parse, pool = node.parse_response, None
        else:
            node, pool = None, client.connection_pool
            connection = await pool.get_connection()
            parse = client.parse_response
        try:
            for batch in batches:
                await connection.send_command("LPUSH", key, *batch)
                await parse(connection, "LPUSH")
                pushed += len(batch)
            deadline = time.monotonic() + timeout
            while True:
                step = max(1, int(min(WAIT_STEP, deadline - time.monotonic()) * 1000))
                await connection.send_command("WAIT", replicas, step)
                acknowledged = int(await parse(connection, "WAIT"))
                if acknowledged >= replicas or time.monotonic() >= deadline:
                    return pushed, acknowledged
        except redis.exceptions.MovedError:
            if pushed or attempt:
                raise
            with _cluster_errors():
                await client.nodes_manager.initialize()
        except BaseException as exc:
            if not isinstance(exc, ResponseError):
                await connection.disconnect()
            raise
        finally:
            if pool is not None:
                await pool.release(connection)
            else:
                node.release(connection)
    raise AssertionError("unreachable")


# --- the clients


def sync_client(config: Config, *, blocking_timeout: float = 0.0,
                command_timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    """A redis-py client for the supervisor, the CLI and producers."""
    from redis.retry import Retry

    kwargs = _client_kwargs(config, command_timeout + blocking_timeout)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    if config.redis_mode == "sentinel":
        kwargs["ssl"] = uses_tls(config)
        sentinel = _Sentinel(list(config.sentinels),
                             sentinel_kwargs=_sentinel_kwargs(config, Retry(NoBackoff(), 0)),
                             **_db_kwargs(config))
        return sentinel.master_for(config.sentinel_master, connection_pool_class=_SentinelPool,
                                   **kwargs)
    if config.redis_mode == "cluster":
        kwargs.pop("health_check_interval")
        return _Cluster.from_url(_url(config), **kwargs)
    return redis.Redis.from_url(_url(config), **kwargs)


def async_client(config: Config, *, blocking_timeout: float = 0.0) -> redis.asyncio.Redis:
    """A redis-py asyncio client; create it after fork, in the process that uses it."""
    from redis.asyncio.retry import Retry

    kwargs = _client_kwargs(config, COMMAND_TIMEOUT + blocking_timeout)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    if config.redis_mode == "sentinel":
        kwargs["ssl"] = uses_tls(config)
        sentinel = _AsyncSentinel(list(config.sentinels),
                                  sentinel_kwargs=_sentinel_kwargs(config, Retry(NoBackoff(), 0)),
                                  **_db_kwargs(config))
        return sentinel.master_for(config.sentinel_master,
                                   connection_pool_class=_AsyncSentinelPool, **kwargs)
    if config.redis_mode == "cluster":
        kwargs.pop("health_check_interval")
        return _AsyncCluster.from_url(_url(config), **kwargs)
    return redis.asyncio.Redis.from_url(_url(config), **kwargs)


def blocking_margin(interval: float) -> float:
    """Socket timeout headroom for a connection that blocks for `interval` seconds."""
    return interval + _BLOCKING_MARGIN
