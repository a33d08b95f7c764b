"""TLS, ACL and secrets, against real servers on loopback; and the standalone baseline load.

A CA, a server certificate and a client certificate are made for each run (openssl); the TLS
servers demand a client certificate, and Sentinel and Cluster run over TLS too. The ACL user
is created from the very rule README.md gives, and the whole pool - supervisor, workers,
retries, dead letters, a poison pill, reconnects and every CLI command - runs as that user
without a single denial in `ACL LOG`. Passwords never show in logs, `ps`, `status` or error
messages. The same 5,000-task load runs on a plain server, over TLS and as the ACL user.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import redis
import redis_topologies as rt
from conftest import children

from workerpool.config import ConfigError, load_config
from workerpool.connection import async_client, sync_client
from workerpool.protocol import AsyncQueue, SyncQueue, new_task

ADMIN_PASSWORD = "admin-s3cret-pw"
POOL_USER = "workerpool"
POOL_PASSWORD = "pool-s3cret-pw"
README = Path(rt.PROJECT) / "README.md"


# --- servers


@pytest.fixture(scope="module")
def topology():
    rt.require_redis()
    servers = rt.Topology("standalone")
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def certs(topology):
    rt.require_tls()
    return rt.Certificates.make(os.path.join(topology.root, "certs"))


@pytest.fixture(scope="module")
def tls_server(topology, certs):
    return topology.server("tls", ["tls-auth-clients yes"], certs=certs)


@pytest.fixture(scope="module")
def plain_server(topology):
    return topology.server("plain")


def readme_acl_rule() -> list[str]:
    """The `ACL SETUSER workerpool ...` line of README.md, as words."""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith(f"ACL SETUSER {POOL_USER} "):
            return line.split()
    pytest.fail("README.md gives no `ACL SETUSER workerpool ...` rule")


@pytest.fixture(scope="module")
def acl_server(topology):
    server = topology.server("acl", password=ADMIN_PASSWORD)
    words = readme_acl_rule()
    words = [f">{POOL_PASSWORD}" if word.startswith(">") else word for word in words]
    admin = server.client()
    try:
        admin.execute_command(*words)
    finally:
        admin.close()
    return server


@pytest.fixture
def clean():
    def flush(server: rt.Server) -> rt.Server:
        client = server.client()
        try:
            client.flushall()
            client.script_flush()  # so the pool's first EVALSHA needs its SCRIPT LOAD
            if server.password:
                client.execute_command("ACL", "LOG", "RESET")
        finally:
            client.close()
        return server

    return flush


def tls_settings(server: rt.Server, certs: rt.Certificates, **extra) -> dict:
    settings = {"redis_url": f"rediss://127.0.0.1:{server.port}/0", "ssl_ca_certs": certs.ca,
                "ssl_certfile": certs.cert("client"), "ssl_keyfile": certs.key("client")}
    settings.update(extra)
    return settings


def acl_denials(server: rt.Server) -> list[dict]:
    admin = server.client()
    try:
        return admin.acl_log(count=100)
    finally:
        admin.close()


# --- TLS


def test_tls_settings_without_a_rediss_url_are_a_config_error():
    with pytest.raises(ConfigError, match="need a rediss:// redis_url"):
        load_config(None, search=False, environ={}, overrides={
            "redis_url": "redis://:pw123@127.0.0.1:6380/0", "ssl_ca_certs": "/etc/ca.pem"})


def test_tls_clients_check_the_server_and_show_their_certificate(tls_server, certs, clean,
                                                                 tmp_path):
    clean(tls_server)
    config = load_config(None, search=False, environ={},
                         overrides=tls_settings(tls_server, certs))
    client = sync_client(config)
    try:
        queue = SyncQueue(client, "jobs")
        queue.enqueue(new_task("t", id="over-tls"))
        assert queue.counts()["pending"] == 1
    finally:
        client.close()

    async def take() -> list[bytes]:
        aclient = async_client(config)
        try:
            return await AsyncQueue(aclient, "jobs").take("{jobs}:processing:h:1", 1)
        finally:
            await aclient.aclose()

    assert json.loads(asyncio.run(take())[0])["id"] == "over-tls"

    # No client certificate: the server (tls-auth-clients yes) refuses the handshake.
    bare = load_config(None, search=False, environ={}, overrides={
        "redis_url": f"rediss://127.0.0.1:{tls_server.port}/0", "ssl_ca_certs": certs.ca})
    with pytest.raises(redis.ConnectionError):
        sync_client(bare).ping()
    # A server whose certificate another CA signed is refused by the client.
    other = rt.Certificates.make(str(tmp_path / "other-ca"))
    wrong_ca = load_config(None, search=False, environ={}, overrides=tls_settings(
        tls_server, certs, ssl_ca_certs=other.ca))
    with pytest.raises(redis.ConnectionError, match="(?i)certificate"):
        sync_client(wrong_ca).ping()
    # ssl_cert_reqs = none: encrypted, the server not checked (not for production).
    unchecked = load_config(None, search=False, environ={}, overrides=tls_settings(
        tls_server, certs, ssl_ca_certs="", ssl_cert_reqs="none"))
    assert sync_client(unchecked).ping()


def _tls_round_trip(overrides: dict) -> None:
    """Push (with WAIT 1), take and BLMOVE through sync and asyncio clients."""
    config = load_config(None, search=False, environ={}, overrides=overrides)
    client = sync_client(config)
    try:
        queue = SyncQueue(client, "jobs")
        queue.enqueue_many([new_task("t", id="a"), new_task("t", id="b")], wait_replicas=1)
        assert queue.counts()["pending"] == 2
    finally:
        client.close()

    async def take() -> list[bytes]:
        command = async_client(config)
        blocking = async_client(config, blocking_timeout=5)
        try:
            aqueue = AsyncQueue(command, "jobs", blocking_client=blocking)
            first = await aqueue.take("{jobs}:processing:h:1", 1)
            second = await aqueue.take_blocking("{jobs}:processing:h:1", 1)
            assert await aqueue.enqueue_many([new_task("t")], wait_replicas=1) == 1
            return [*first, second]
        finally:
            await command.aclose()
            await blocking.aclose()

    assert [json.loads(raw)["id"] for raw in asyncio.run(take())] == ["a", "b"]


def test_sentinel_and_its_data_nodes_over_tls(certs):
    """rediss:// in Sentinel mode: TLS to the Sentinels and to the master they name."""
    topology = rt.SentinelSet(replicas=1, sentinels=1, certs=certs, password=ADMIN_PASSWORD)
    try:
        _tls_round_trip({
            "redis_mode": "sentinel", "sentinels": topology.sentinel_hosts,
            "redis_url": f"rediss://:{ADMIN_PASSWORD}@127.0.0.1/0", "ssl_ca_certs": certs.ca,
            "ssl_certfile": certs.cert("client"), "ssl_keyfile": certs.key("client")})
    finally:
        topology.close()


def test_a_cluster_over_tls(certs):
    """In cluster mode a CA file alone turns TLS on (a redis:// URL here)."""
    topology = rt.Cluster(masters=3, replicas=1, certs=certs)
    try:
        url = topology.url.replace("rediss://", "redis://")
        _tls_round_trip({
            "redis_mode": "cluster", "redis_url": url, "ssl_ca_certs": certs.ca,
            "ssl_certfile": certs.cert("client"), "ssl_keyfile": certs.key("client")})
    finally:
        topology.close()


# --- ACL


def test_the_readme_acl_user_reaches_its_queue_and_nothing_else(acl_server, clean):
    clean(acl_server)
    user = acl_server.client(username=POOL_USER, password=POOL_PASSWORD)
    try:
        assert user.lpush("jobs", "x") == 1
        assert user.lpush("{jobs}:dead", "x") == 1
        for forbidden in (lambda: user.get("other"), lambda: user.lpush("jobs2", "x"),
                          lambda: user.flushall(), lambda: user.config_get("*"),
                          lambda: user.keys("*"), lambda: user.eval("return 1", 0)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
    finally:
        user.close()
    clean(acl_server)


def test_the_password_from_the_environment_or_a_file_wins_over_the_url(acl_server, tmp_path,
                                                                       monkeypatch):
    url = f"redis://{POOL_USER}:stale-pw@127.0.0.1:{acl_server.port}/0"
    config = load_config(None, search=False, environ={}, overrides={"redis_url": url})
    with pytest.raises(redis.AuthenticationError):
        sync_client(config).ping()
    monkeypatch.setenv("WORKERPOOL_REDIS_PASSWORD", POOL_PASSWORD)
    assert sync_client(config).ping()
    monkeypatch.delenv("WORKERPOOL_REDIS_PASSWORD")
    password_file = tmp_path / "pw"
    password_file.write_text(POOL_PASSWORD + "\n")
    from_file = load_config(None, search=False, environ={}, overrides={
        "redis_url": url, "password_file": str(password_file)})
    assert sync_client(from_file).ping()

    async def async_ping() -> bool:
        client = async_client(from_file)
        try:
            return await client.ping()
        finally:
            await client.aclose()

    assert asyncio.run(async_ping())


@pytest.mark.slow
def test_the_whole_pool_life_cycle_as_the_minimal_acl_user(acl_server, clean, tmp_path):
    """Supervisor and workers, a retried task, an invalid one, a poison pill that kills its
    worker, a reconnect after every client is killed, and each CLI command: no denial."""
    clean(acl_server)
    env = {"WORKERPOOL_REDIS_PASSWORD": POOL_PASSWORD}
    ini = rt.write_ini(tmp_path / "wp.ini", rt.pool_settings(
        str(tmp_path), redis_url=f"redis://{POOL_USER}@127.0.0.1:{acl_server.port}/0",
        retry_backoff=0.1, max_deliveries=2, crash_limit=20))
    record = str(tmp_path / "runs")
    ids = rt.new_ids(300)
    tasks = rt.task_lines(ids, record, 0.01)
    flaky = [json.dumps({"type": "t", "id": "flaky", "attempts": 0,
                         "data": {"file": record, "failures": 2}}).encode()]
    pill = [json.dumps({"type": "t", "id": "pill", "data": {"file": record, "crash": True}})
            .encode()]
    queue = rt.queue_for(ini, env)
    try:
        queue.enqueue_many(tasks + flaky + [b"not json"])
        with pytest.raises(TimeoutError):  # WAIT is allowed (there is no replica to wait for)
            queue.enqueue(new_task("t", {"file": record}, id="waited"), wait_replicas=1,
                          wait_timeout=0.1)
    finally:
        queue.client.close()
    enqueued = rt.cli(ini, "enqueue", "t", json.dumps({"file": record}), "--id", "by-cli",
                      env=rt.cli_env(**env))
    assert enqueued.returncode == 0, enqueued.stderr
    pool = rt.Pool(ini, str(tmp_path / "pool.log"), env=rt.cli_env(**env))
    try:
        rt.wait_progress(record, 100, 30, pool)
        admin = acl_server.client()
        try:  # every connection of the pool drops: workers reconnect and reconcile
            admin.client_kill_filter(_type="normal", skipme=True)
        finally:
            admin.close()
        rt.wait_all_done([*ids, "flaky", "by-cli", "waited"], record, 60, pool)
        # Idle connections killed above may have been replaced silently by redis-py's pool;
        # a worker blocked in BLMOVE cannot be: kill again once both block, and the workers
        # must notice, reconnect and reconcile, as the ACL user.
        admin = acl_server.client()
        try:
            rt.wait_until(lambda: admin.info("clients")["blocked_clients"] >= rt.POOL_WORKERS,
                          30, "both workers blocked in BLMOVE")
            admin.client_kill_filter(_type="normal", skipme=True)
        finally:
            admin.close()
        rt.wait_until(lambda: "redis reachable again" in pool.log(), 30, "a reconnect")
        # The poison pill alone (its batch-mates would be counted as its victims' tasks).
        queue = rt.queue_for(ini, env)
        try:
            queue.enqueue_many(pill)
        finally:
            queue.client.close()
        status = rt.cli(ini, "status", "--all-hosts", "--json", env=rt.cli_env(**env))
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert [host["host"] for host in report["hosts"]] == ["host-a"]

        def dead_letters() -> list:
            listed = rt.cli(ini, "dead", "list", "--json", env=rt.cli_env(**env))
            entries = json.loads(listed.stdout) if listed.returncode == 0 else []
            return entries if len(entries) == 2 else []

        reasons = {e["reason"] for e in rt.wait_until(dead_letters, 30, "two dead letters")}
        assert reasons == {"invalid_json", "max_deliveries"}
        assert pool.stop() == 0, pool.log()[-3000:]
    finally:
        pool.close()
    for args in (["stats", "--json"], ["dead", "retry", "--all"], ["dead", "purge", "--yes"],
                 ["clear", "--yes"], ["status"]):
        done = rt.cli(ini, *args, env=rt.cli_env(**env))
        assert done.returncode in (0, 3), (args, done.stderr)  # status: 3 = not running
    assert "redis unavailable" in pool.log()  # the reconnect after the second kill
    assert acl_denials(acl_server) == []
    assert POOL_PASSWORD not in pool.log()


@pytest.mark.slow
def test_passwords_never_show_in_ps_status_logs_or_errors(acl_server, clean, tmp_path):
    clean(acl_server)
    url = f"redis://{POOL_USER}:{POOL_PASSWORD}@127.0.0.1:{acl_server.port}/0"
    # A config file that holds the password, readable by everyone: a warning at start.
    ini = rt.write_ini(tmp_path / "wp.ini", rt.pool_settings(str(tmp_path), redis_url=url),
                       mode=0o644)
    pool = rt.Pool(ini, str(tmp_path / "pool.log"))
    try:
        pids = rt.wait_until(lambda: _pool_pids(pool, 3), 20, "supervisor and 2 workers")
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                assert POOL_PASSWORD.encode() not in handle.read()
        status = rt.cli(ini, "status", "--json", "--all-hosts")
        assert status.returncode == 0, status.stderr
        assert POOL_PASSWORD not in status.stdout + status.stderr
        assert "***" in status.stdout
        assert pool.stop() == 0
    finally:
        pool.close()
    log = pool.log()
    assert "readable by others" in log and POOL_PASSWORD not in log
    # The password on the command line is hidden from `ps` once the pool runs.
    ini_private = rt.write_ini(tmp_path / "private.ini", rt.pool_settings(
        str(tmp_path), redis_url=f"redis://127.0.0.1:{acl_server.port}/0"))
    pool = rt.Pool(ini_private, str(tmp_path / "pool2.log"), extra_args=["--redis-url", url])
    try:
        pids = rt.wait_until(lambda: _pool_pids(pool, 3), 20, "supervisor and 2 workers")
        rt.wait_until(lambda: all(_cmdline_clean(pid) for pid in pids), 10,
                      "every process title to hide the password")
        assert pool.stop() == 0
    finally:
        pool.close()
    # A wrong password: the error names the server, never the password.
    wrong = rt.write_ini(tmp_path / "wrong.ini", rt.pool_settings(
        str(tmp_path), redis_url=f"redis://{POOL_USER}:not-the-pw-42@127.0.0.1:"
                                 f"{acl_server.port}/0"))
    start = rt.cli(wrong, "start", "--foreground")
    assert start.returncode == 1
    assert "not-the-pw-42" not in start.stderr + start.stdout
    assert "***" in start.stderr


def _pool_pids(pool: rt.Pool, count: int) -> list[int] | None:
    pids = [pool.pid, *children(pool.pid)]
    return pids if len(pids) >= count else None


def _cmdline_clean(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return POOL_PASSWORD.encode() not in handle.read()


# --- the same 5,000-task load: standalone, over TLS, as the minimal ACL user


@pytest.mark.slow
def test_5000_tasks_on_a_standalone_server(plain_server, clean, tmp_path):
    clean(plain_server)
    ini = rt.write_ini(tmp_path / "wp.ini", rt.pool_settings(
        str(tmp_path), redis_url=f"redis://127.0.0.1:{plain_server.port}/0"))
    result = rt.run_load("standalone", str(tmp_path), ini)
    rt.report(result)
    assert (result.tally.lost, result.tally.duplicates) == (0, 0), result.tally


@pytest.mark.slow
def test_5000_tasks_over_tls(tls_server, certs, clean, tmp_path):
    clean(tls_server)
    ini = rt.write_ini(tmp_path / "wp.ini", rt.pool_settings(
        str(tmp_path), **tls_settings(tls_server, certs)))
    result = rt.run_load("standalone-tls", str(tmp_path), ini)
    rt.report(result)
    assert (result.tally.lost, result.tally.duplicates) == (0, 0), result.tally


@pytest.mark.slow
def test_5000_tasks_as_the_minimal_acl_user(acl_server, clean, tmp_path):
    clean(acl_server)
    password_file = tmp_path / "pw"
    password_file.write_text(POOL_PASSWORD)
    password_file.chmod(0o600)
    ini = rt.write_ini(tmp_path / "wp.ini", rt.pool_settings(
        str(tmp_path), redis_url=f"redis://{POOL_USER}@127.0.0.1:{acl_server.port}/0",
        password_file=str(password_file)))
    result = rt.run_load("standalone-acl", str(tmp_path), ini)
    rt.report(result)
    assert (result.tally.lost, result.tally.duplicates) == (0, 0), result.tally
    assert acl_denials(acl_server) == []

