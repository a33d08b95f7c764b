"""Sentinel: a master, a replica and three Sentinels on loopback, all with passwords.

The clients find the master through the Sentinels (with the Sentinels' own password), WAIT
counts the replica, a change of master reaches the pool once as a connection error (never a
silent switch), and 5,000 tasks run to completion through a forced `SENTINEL FAILOVER` in the
middle of the load: none lost, duplicates only for what ran on the old master before the pool
noticed. Two more sets: the same failover with `min-replicas-to-write 1` (no split brain, a
long pause), and the death of the master (SIGKILL), which is what Sentinel is for.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import redis
import redis_topologies as rt

from workerpool.config import load_config
from workerpool.connection import async_client, sync_client
from workerpool.protocol import AsyncQueue, SyncQueue, new_task

DATA_PASSWORD = "data-s3cret-pw"
SENTINEL_PASSWORD = "sentinel-s3cret-pw"


@pytest.fixture(scope="module")
def sentinel_set():
    rt.require_redis()
    topology = rt.SentinelSet(replicas=1, sentinels=3, password=DATA_PASSWORD,
                              sentinel_password=SENTINEL_PASSWORD)
    yield topology
    topology.close()


@pytest.fixture
def clean(sentinel_set):
    client = sentinel_set.master().client()
    client.flushall()
    client.close()
    return sentinel_set


@pytest.fixture
def ini(tmp_path, clean):
    password_file = tmp_path / "redis.password"
    password_file.write_text(DATA_PASSWORD + "\n")
    password_file.chmod(0o600)
    settings = rt.pool_settings(
        str(tmp_path), redis_mode="sentinel", redis_url="redis://127.0.0.1/0",
        sentinels=clean.sentinel_hosts, sentinel_master=clean.MASTER,
        sentinel_password=SENTINEL_PASSWORD, password_file=str(password_file))
    return rt.write_ini(tmp_path / "workerpool.ini", settings)


def test_sync_and_async_clients_find_the_master_through_authenticated_sentinels(ini, clean):
    config = load_config(ini, environ={})
    master_port = clean.master_address()[1]
    client = sync_client(config)
    try:
        queue = SyncQueue(client, config.redis_key)
        queue.enqueue(new_task("t", id="one"))
        assert queue.counts()["pending"] == 1
        assert client.connection_pool.master_address[1] == master_port
    finally:
        client.close()

    async def take_one() -> list[bytes]:
        aclient = async_client(config)
        try:
            items = await AsyncQueue(aclient, config.redis_key).take(
                "{jobs}:processing:h:1", 5)
            assert aclient.connection_pool.master_address[1] == master_port
            return items
        finally:
            await aclient.aclose()

    assert len(asyncio.run(take_one())) == 1


def test_a_wrong_sentinel_password_fails_without_showing_it(ini):
    config = load_config(ini, environ={"WORKERPOOL_SENTINEL_PASSWORD": "wrong-pw-123"})
    client = sync_client(config)
    try:
        with pytest.raises(redis.RedisError) as caught:
            client.ping()
    finally:
        client.close()
    assert "wrong-pw-123" not in str(caught.value)
    assert SENTINEL_PASSWORD not in str(caught.value)


def test_wait_replicas_counts_the_replica(ini, tmp_path):
    config = load_config(ini, environ={})
    client = sync_client(config)
    try:
        queue = SyncQueue(client, config.redis_key)
        assert queue.enqueue_many([new_task("t") for _ in range(3)], wait_replicas=1) == 3
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="only 1 of 2 replicas"):
            queue.enqueue_many([new_task("t")], wait_replicas=2, wait_timeout=0.5)
        assert time.monotonic() - started < 3
        assert queue.counts()["pending"] == 4  # queued either way
    finally:
        client.close()

    async def async_wait() -> int:
        aclient = async_client(config)
        try:
            return await AsyncQueue(aclient, config.redis_key).enqueue_many(
                [new_task("t")], wait_replicas=1)
        finally:
            await aclient.aclose()

    assert asyncio.run(async_wait()) == 1
    done = rt.cli(ini, "enqueue", "t", "{}", "--wait-replicas", "1", "--quiet")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_5000_tasks_ride_through_a_sentinel_failover(ini, clean, tmp_path):
    config = load_config(ini, environ={})
    # Clients opened before the failover: each sees the change once, as a ConnectionError,
    # and then works against the new master (never a silent switch mid-protocol).
    sync_before = sync_client(config)
    sync_before.ping()
    switched: dict[str, int] = {}

    def fault() -> None:
        old, new = clean.failover()
        switched.update(old=old, new=new)

    result = rt.run_load("sentinel-failover", str(tmp_path), ini, fault=fault,
                         fault_name="SENTINEL FAILOVER (forced) during the load",
                         wait_replicas=1)
    rt.report(result)
    assert result.tally.lost == 0, result.tally
    assert switched["new"] != switched["old"]
    assert "Sentinel moved the master" in result.log, result.log[-3000:]
    # Duplicates: the tasks in flight at the fault, and those the old master handed out
    # between its replica's promotion and the pool's switch (asynchronous replication).
    assert result.tally.duplicates <= rt.IN_FLIGHT + result.runs_near_fault, result.figures
    for secret in (DATA_PASSWORD, SENTINEL_PASSWORD):
        assert secret not in result.log

    try:
        with pytest.raises(redis.ConnectionError):
            sync_before.ping()
        assert sync_before.ping()
        assert sync_before.connection_pool.master_address[1] == switched["new"]
    finally:
        sync_before.close()
    # The new master holds every key of the queue, and nothing is left in it.
    fresh = SyncQueue(sync_client(config), config.redis_key)
    try:
        assert fresh.counts() == {"pending": 0, "processing": 0, "retry": 0, "dead": 0}
    finally:
        fresh.client.close()
    assert os.path.exists(config.pidfile) is False


@pytest.mark.slow
def test_5000_tasks_through_a_failover_with_min_replicas_to_write(tmp_path):
    """min-replicas-to-write 1 with one replica: the old master refuses writes as soon as its
    replica is promoted, so the pool runs nothing there after the switch; the price is a pause until
    Sentinel makes the old master the new one's replica (the new master has none before)."""
    rt.require_redis()
    topology = rt.SentinelSet(replicas=1, sentinels=3,
                              data_config=["min-replicas-to-write 1", "min-replicas-max-lag 10"])
    try:
        ini = rt.write_ini(tmp_path / "workerpool.ini", rt.pool_settings(
            str(tmp_path), redis_mode="sentinel", redis_url="redis://127.0.0.1/0",
            sentinels=topology.sentinel_hosts))
        result = rt.run_load("sentinel-failover-min-replicas", str(tmp_path), ini,
                             fault=topology.failover, wait_replicas=1, timeout=180,
                             fault_name="SENTINEL FAILOVER (forced), min-replicas-to-write 1")
    finally:
        topology.close()
    rt.report(result)
    assert result.tally.lost == 0, result.tally
    # The tasks in flight, and writes the old master acknowledged but had not yet sent to its
    # replica when Sentinel promoted it (more of them when the machine is busy).
    assert result.tally.duplicates <= 2 * rt.IN_FLIGHT, result.figures
    assert "NOREPLICAS" in result.log


@pytest.mark.slow
def test_5000_tasks_ride_through_the_death_of_the_master(tmp_path):
    """What Sentinel is for: the master dies (SIGKILL) under load, the Sentinels agree it is
    down and promote the replica. A dead master takes no writes, so nothing runs twice but
    what was in flight or not yet replicated."""
    rt.require_redis()
    topology = rt.SentinelSet(replicas=1, sentinels=3)
    try:
        ini = rt.write_ini(tmp_path / "workerpool.ini", rt.pool_settings(
            str(tmp_path), redis_mode="sentinel", redis_url="redis://127.0.0.1/0",
            sentinels=topology.sentinel_hosts))
        master = topology.master()

        def fault() -> None:
            master.kill()
            rt.wait_until(lambda: topology.master_address()[1] != master.port, 30,
                          "the Sentinels to promote the replica")

        result = rt.run_load("sentinel-master-killed", str(tmp_path), ini, fault=fault,
                             wait_replicas=1, fault_name="SIGKILL of the master")
    finally:
        topology.close()
    rt.report(result)
    assert result.tally.lost == 0, result.tally
    assert result.tally.duplicates <= 2 * rt.IN_FLIGHT, result.figures
    assert result.reconnected > 0


@pytest.mark.slow
def test_a_planned_switchover_with_client_pause_reruns_only_what_was_in_flight(tmp_path):
    """The recipe for planned maintenance (README): `CLIENT PAUSE 3000 WRITE` on the master,
    then `SENTINEL FAILOVER`. Writes wait on the old master instead of landing there, the
    clients move to the new master meanwhile, so only the tasks in flight run twice."""
    rt.require_redis()
    topology = rt.SentinelSet(replicas=1, sentinels=3)
    try:
        ini = rt.write_ini(tmp_path / "workerpool.ini", rt.pool_settings(
            str(tmp_path), redis_mode="sentinel", redis_url="redis://127.0.0.1/0",
            sentinels=topology.sentinel_hosts))

        def fault() -> None:
            master = topology.master().client()
            try:
                master.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
            finally:
                master.close()
            topology.failover()

        result = rt.run_load("sentinel-switchover-paused", str(tmp_path), ini, fault=fault,
                             wait_replicas=1,
                             fault_name="CLIENT PAUSE 3000 WRITE, then SENTINEL FAILOVER")
    finally:
        topology.close()
    rt.report(result)
    assert result.tally.lost == 0, result.tally
    # In flight, or finished with their results waiting behind the pause (2 x 40 here).
    assert result.tally.duplicates <= 3 * rt.IN_FLIGHT, result.figures
