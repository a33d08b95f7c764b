"""Redis Cluster: three masters with one replica each, made by `redis-cli --cluster create`.

Every key of a queue shares its hash tag, so every script, BLMOVE, pipeline and transaction
of the protocol runs on one node; WAIT goes to that node, on the connection that wrote; the
processing lists are scanned on that node only. Two supervisors with different host_id share
one queue and `status --all-hosts` shows both. 5,000 tasks run through a manual failover
(`CLUSTER FAILOVER` on the queue's replica) and through the death (SIGKILL) of the queue's
master: none lost, duplicates only for tasks in flight at the fault.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import redis
import redis_topologies as rt
from redis.cluster import key_slot

from workerpool.config import ConfigError, load_config
from workerpool.connection import async_client, sync_client
from workerpool.protocol import AsyncQueue, QueueKeys, Settlement, SyncQueue, new_task

QUEUE = "jobs"


@pytest.fixture(scope="module")
def cluster():
    rt.require_redis()
    topology = rt.Cluster(masters=3, replicas=1, node_timeout_ms=1000)
    yield topology
    topology.close()


@pytest.fixture
def clean(cluster):
    cluster.wait_ok()
    client = cluster.client()
    try:
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    finally:
        client.close()
    return cluster


def cluster_url(cluster: rt.Cluster, avoid: int | None = None) -> str:
    """A startup node that is alive (and not the one a test is about to kill)."""
    node = next(n for n in cluster.nodes if n.process is not None and n.port != avoid)
    return f"redis://{node.address}/0"


def make_ini(tmp_path, cluster: rt.Cluster, host: str = "host-a", avoid: int | None = None,
             **settings) -> str:
    values = rt.pool_settings(str(tmp_path), host=host, redis_mode="cluster",
                              redis_url=cluster_url(cluster, avoid), **settings)
    return rt.write_ini(tmp_path / f"{host}.ini", values)


def cluster_config(cluster: rt.Cluster, **overrides):
    values = {"redis_mode": "cluster", "redis_url": cluster_url(cluster), "redis_key": QUEUE}
    values.update(overrides)
    return load_config(None, search=False, environ={}, overrides=values)


@pytest.mark.parametrize("queue", ["jobs", "{jobs}", "app:{orders}:queue", "a{b", "x{y}z{w}"])
def test_every_key_of_a_queue_hashes_to_one_slot(queue):
    keys = QueueKeys(queue)
    names = [keys.queue, keys.retry, keys.dead, keys.hosts, keys.deliveries,
             keys.host_status("host-a"), keys.processing("host-a", "1-123")]
    assert len({key_slot(name.encode()) for name in names}) == 1, names


@pytest.mark.parametrize("queue", ["a{}b", "x}y", "{}jobs"])
def test_a_queue_name_that_would_split_its_keys_across_slots_is_refused(queue):
    with pytest.raises(ConfigError, match="hash tag"):
        load_config(None, search=False, environ={}, overrides={"redis_key": queue})


def test_the_whole_protocol_runs_on_a_cluster(clean):
    config = cluster_config(clean)
    client = sync_client(config)
    queue = SyncQueue(client, QUEUE)
    mine, other = queue.keys.processing("host-a", "1-1"), queue.keys.processing("host-b", "1-2")
    try:
        # A second queue whose keys live on another node: never seen by this queue's scans.
        decoy = SyncQueue(client, "other")
        assert key_slot(b"other") != key_slot(QUEUE.encode())
        decoy.take(decoy.keys.processing("host-a", "9-9"), 1)
        client.lpush(decoy.keys.processing("host-a", "9-9"), b"x")

        queue.enqueue_many([new_task("t", id=str(i)) for i in range(10)])
        taken = queue.take(mine, 4)  # Lua script
        assert [json.loads(raw)["id"] for raw in taken] == ["0", "1", "2", "3"]
        queue.take(other, 1)
        assert queue.processing_lists() == sorted([mine.encode(), other.encode()])
        assert queue.processing_lists("host-a") == [mine.encode()]
        settlement = Settlement()
        settlement.ack(taken[0])
        settlement.retry(taken[1], taken[1], time.time() - 1)
        settlement.dead(taken[2], b'{"task": "2", "reason": "test"}')
        queue.settle(mine, settlement)  # Lua script
        assert queue.move_due_retries() == 1  # Lua script
        assert queue.release_unknown(mine, []) == 1  # Lua script: taken[3] goes back
        assert queue.requeue_host("host-b", 3) == 1  # SCAN + Lua script
        queue.heartbeat("host-a", b'{"workers": []}', ttl=30)  # pipeline
        assert [host for host, _, _ in queue.live_hosts(60)] == ["host-a"]
        assert queue.counts() == {"pending": 8, "processing": 0, "retry": 0, "dead": 1}
        (_, entry), = queue.dead_entries()
        assert queue.revive(entry) is True  # Lua script: back to the queue
        assert queue.purge_dead() == 0  # MULTI/EXEC on one slot
        assert queue.clear() == 9  # MULTI/EXEC on one slot
        queue.forget_host("host-a")
    finally:
        client.close()

    async def blocking_take() -> tuple[bytes | None, bytes | None]:
        command = async_client(config)
        blocking = async_client(config, blocking_timeout=5)
        aqueue = AsyncQueue(command, QUEUE, blocking_client=blocking)
        try:
            empty = await aqueue.take_blocking(mine, 0.2)  # BLMOVE times out
            await aqueue.enqueue_many([new_task("t", id="b")])
            got = await aqueue.take_blocking(mine, 1)  # BLMOVE
            settlement = Settlement()
            settlement.ack(got)
            await aqueue.settle(mine, settlement)
            return empty, got
        finally:
            await command.aclose()
            await blocking.aclose()

    empty, got = asyncio.run(blocking_take())
    assert empty is None and json.loads(got)["id"] == "b"


def test_wait_replicas_waits_on_the_queue_master(clean):
    """Each master has one replica: WAIT 2 must time out. redis-py alone would send WAIT to
    every primary on fresh connections and add the answers up (3 >= 2)."""
    config = cluster_config(clean)
    client = sync_client(config)
    queue = SyncQueue(client, QUEUE)
    try:
        assert queue.enqueue_many([new_task("t") for _ in range(5)], wait_replicas=1) == 5
        with pytest.raises(TimeoutError, match="only 1 of 2 replicas"):
            queue.enqueue(new_task("t"), wait_replicas=2, wait_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            queue.enqueue_many([new_task("t")], wait_replicas=2, wait_timeout=0.3)
        assert time.monotonic() - started < 2
        assert queue.counts()["pending"] == 7
    finally:
        client.close()

    async def async_wait() -> None:
        aclient = async_client(config)
        try:
            aqueue = AsyncQueue(aclient, QUEUE)
            assert await aqueue.enqueue_many([new_task("t")], wait_replicas=1) == 1
            with pytest.raises(TimeoutError):
                await aqueue.enqueue_many([new_task("t")], wait_replicas=2, wait_timeout=0.3)
        finally:
            await aclient.aclose()

    asyncio.run(async_wait())


def test_an_unreachable_cluster_is_a_redis_error_with_the_url_masked(tmp_path):
    port = rt.free_port()
    config = load_config(None, search=False, environ={}, overrides={
        "redis_mode": "cluster", "redis_url": f"redis://user:hunter2pw@127.0.0.1:{port}/0"})
    with pytest.raises(redis.ConnectionError):
        sync_client(config).ping()
    ini = rt.write_ini(tmp_path / "wp.ini", rt.pool_settings(
        str(tmp_path), redis_mode="cluster",
        redis_url=f"redis://user:hunter2pw@127.0.0.1:{port}/0"))
    start = rt.cli(ini, "start", "--foreground")
    assert start.returncode == 1, start.stderr
    assert "hunter2pw" not in start.stderr + start.stdout
    assert "Traceback" not in start.stderr


@pytest.mark.slow
def test_two_supervisors_share_one_queue_and_status_lists_every_host(clean, tmp_path):
    ini_a = make_ini(tmp_path, clean, "host-a")
    ini_b = make_ini(tmp_path, clean, "host-b", workers=1)
    record = str(tmp_path / "runs")
    ids = rt.new_ids(2000)
    queue = rt.queue_for(ini_a)
    try:
        queue.enqueue_many(rt.task_lines(ids, record, 0.01))
    finally:
        queue.client.close()
    pools = [rt.Pool(ini_a, str(tmp_path / "a.log")), rt.Pool(ini_b, str(tmp_path / "b.log"))]
    try:
        rt.wait_progress(record, 300, 30, pools[0])

        def both_hosts() -> dict | None:
            status = rt.cli(ini_a, "status", "--all-hosts", "--json")
            report = json.loads(status.stdout)
            hosts = report.get("hosts")
            if not isinstance(hosts, list) or {h["host"] for h in hosts} != {"host-a", "host-b"}:
                return None
            if not all(h.get("supervisor", {}).get("workers") for h in hosts):
                return None
            return report

        report = rt.wait_until(both_hosts, 20, "both hosts in status --all-hosts")
        by_host = {h["host"]: h["supervisor"] for h in report["hosts"]}
        assert len(by_host["host-a"]["workers"]) == 2
        assert len(by_host["host-b"]["workers"]) == 1
        assert by_host["host-b"]["redis_key"] == QUEUE
        text = rt.cli(ini_b, "status", "--all-hosts")
        assert "host host-a:" in text.stdout and "host host-b:" in text.stdout, text.stdout
        result = rt.wait_all_done(ids, record, 60, pools[0])
        for pool in pools:
            assert pool.stop() == 0, pool.log()[-2000:]
    finally:
        for pool in pools:
            pool.close()
    assert result.lost == 0 and result.duplicates == 0, result
    pids = {run.pid for run in result.runs}
    assert len(pids) == 3  # all three workers, on both hosts, took part
    queue = rt.queue_for(ini_a)
    try:
        assert queue.live_hosts(60) == []  # each supervisor forgets itself on the way out
    finally:
        queue.client.close()


@pytest.mark.slow
def test_5000_tasks_ride_through_a_manual_cluster_failover(clean, tmp_path):
    ini = make_ini(tmp_path, clean)
    moved: dict[str, int] = {}

    def fault() -> None:
        old, new = clean.failover(QUEUE)
        moved.update(old=old.port, new=new.port)

    result = rt.run_load("cluster-manual-failover", str(tmp_path), ini, fault=fault,
                         fault_name="CLUSTER FAILOVER on the queue's replica", wait_replicas=1)
    rt.report(result)
    assert moved["old"] != moved["new"]
    assert clean.roles_for_key(QUEUE)[0].port == moved["new"]
    assert result.tally.lost == 0, result.tally
    # A manual failover is coordinated (the old master stops writes until its replica has
    # caught up): nothing written is lost, so duplicates are at most the tasks in flight.
    assert result.tally.duplicates <= rt.IN_FLIGHT, result.figures


@pytest.mark.slow
def test_5000_tasks_ride_through_the_death_of_the_queue_master(clean, tmp_path):
    master, replicas = clean.roles_for_key(QUEUE)
    assert replicas, "the queue's master has no replica"
    ini = make_ini(tmp_path, clean, avoid=master.port)

    def fault() -> None:
        master.kill()
        rt.wait_until(lambda: clean.roles_for_key(QUEUE)[0].port != master.port, 30,
                      "a replica to take over the queue's slot")

    result = rt.run_load("cluster-master-killed", str(tmp_path), ini, fault=fault,
                         fault_name="SIGKILL of the queue's master", wait_replicas=1)
    rt.report(result)
    assert result.tally.lost == 0, result.tally
    # Writes the dead master acknowledged but had not yet sent to its replica (asynchronous
    # replication) are gone: a take or an ack of the last instant, so a task runs again.
    assert result.tally.duplicates <= 2 * rt.IN_FLIGHT, result.figures
    assert result.reconnected > 0, "the workers should have seen the master die"
    assert os.path.exists(str(tmp_path / "host-a.pid")) is False
