"""Redis clients built from the config: standalone URL (redis, rediss, unix), Sentinel or Cluster.

redis-py's own retries are turned off: a lost reply to a take or an ack must be seen by the
worker, which reconciles its processing list, rather than replayed blindly by the client.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff

from workerpool.config import Config

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
# Room above the longest blocking call so a blocking pop never trips the socket timeout.
_BLOCKING_MARGIN = 5.0
COMMAND_TIMEOUT = 10.0


def redis_url(config: Config) -> str:
    """The URL clients connect to (the embedded server's socket when redis_url = embedded)."""
    if config.redis_url == "embedded":
        from workerpool.embedded import socket_path

        return "unix://" + socket_path(config)
    return config.redis_url


def _client_kwargs(config: Config, socket_timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(socket_timeout, COMMAND_TIMEOUT),
        "health_check_interval": 0,
    }
    password = config.redis_password
    if password:
        kwargs["password"] = password
    if config.redis_url.startswith("rediss:") or config.ssl_ca_certs or config.ssl_certfile:
        kwargs["ssl_cert_reqs"] = _CERT_REQS[config.ssl_cert_reqs]
        if config.ssl_ca_certs:
            kwargs["ssl_ca_certs"] = config.ssl_ca_certs
        if config.ssl_certfile:
            kwargs["ssl_certfile"] = config.ssl_certfile
        if config.ssl_keyfile:
            kwargs["ssl_keyfile"] = config.ssl_keyfile
        if config.redis_mode == "sentinel" or config.redis_mode == "cluster":
            kwargs["ssl"] = True
    return kwargs


def _sentinel_kwargs(config: Config) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": COMMAND_TIMEOUT}
    if config.sentinel_username:
        kwargs["username"] = config.sentinel_username
    if config.sentinel_password:
        kwargs["password"] = config.sentinel_password
    return kwargs


def sync_client(config: Config, *, blocking_timeout: float = 0.0) -> redis.Redis:
    """A redis-py client for the supervisor and the CLI."""
    from redis.retry import Retry

    kwargs = _client_kwargs(config, COMMAND_TIMEOUT + blocking_timeout)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    if config.redis_mode == "sentinel":
        sentinel = redis.Sentinel(
            list(config.sentinels), sentinel_kwargs=_sentinel_kwargs(config), **_db_kwargs(config)
        )
        return sentinel.master_for(config.sentinel_master, **kwargs)
    if config.redis_mode == "cluster":
        kwargs.pop("health_check_interval")
        return redis.RedisCluster.from_url(redis_url(config), **kwargs)
    return redis.Redis.from_url(redis_url(config), **kwargs)


def async_client(config: Config, *, blocking_timeout: float = 0.0) -> redis.asyncio.Redis:
    """A redis-py asyncio client; create it after fork, in the process that uses it."""
    from redis.asyncio.retry import Retry

    kwargs = _client_kwargs(config, COMMAND_TIMEOUT + blocking_timeout)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    if config.redis_mode == "sentinel":
        sentinel = redis.asyncio.Sentinel(
            list(config.sentinels), sentinel_kwargs=_sentinel_kwargs(config), **_db_kwargs(config)
        )
        return sentinel.master_for(config.sentinel_master, **kwargs)
    if config.redis_mode == "cluster":
        kwargs.pop("health_check_interval")
        return redis.asyncio.RedisCluster.from_url(redis_url(config), **kwargs)
    return redis.asyncio.Redis.from_url(redis_url(config), **kwargs)


def blocking_margin(interval: float) -> float:
    """Socket timeout headroom for a connection that blocks for `interval` seconds."""
    return interval + _BLOCKING_MARGIN


def _db_kwargs(config: Config) -> dict[str, Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(config.redis_url)
    kwargs: dict[str, Any] = {}
    db = parts.path.lstrip("/")
    if db.isdigit():
        kwargs["db"] = int(db)
    if parts.username:
        kwargs["username"] = parts.username
    if parts.password and not config.redis_password:
        kwargs["password"] = parts.password
    return kwargs
