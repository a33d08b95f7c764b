"""The producer API and the seed's sample-task script, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

import workerpool
from workerpool import producer
from workerpool.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def config(redis_url):
    yield load_config(None, search=False, environ={}, overrides={"redis_url": redis_url})
    producer.close()


def pending(client, key="async_tasks"):
    """Pending tasks, oldest first."""
    return [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]


def test_enqueue_returns_the_id_and_writes_the_wire_format(config, redis_client):
    task_id = workerpool.enqueue("email", {"to": "a@example.com"}, config=config, priority=3)
    (task,) = pending(redis_client)
    assert task["id"] == task_id
    assert task["type"] == "email" and task["data"] == {"to": "a@example.com"}
    assert task["attempts"] == 0 and isinstance(task["enqueued_at"], float)
    assert task["priority"] == 3  # extra fields are top-level fields, kept


def test_enqueue_many_keeps_order_and_accepts_pairs_and_dicts(config, redis_client):
    ids = workerpool.enqueue_many(
        [("a", {"n": 1}), {"type": "b", "data": {"n": 2}, "id": "mine"}, ("c", None)],
        config=config,
    )
    assert ids[1] == "mine" and len(set(ids)) == 3
    assert [t["type"] for t in pending(redis_client)] == ["a", "b", "c"]
    assert [t["id"] for t in pending(redis_client)] == ids


def test_enqueue_many_rejects_a_task_without_type(config, redis_client):
    with pytest.raises(ValueError, match="string 'type'"):
        workerpool.enqueue_many([{"data": {}}], config=config)
    assert redis_client.llen("async_tasks") == 0


def test_redis_key_override(config, redis_client):
    workerpool.enqueue("x", config=config, redis_key="other{q}")
    assert redis_client.llen("other{q}") == 1
    assert redis_client.llen("async_tasks") == 0


def test_redis_key_override_keeps_every_other_setting(tmp_path, redis_url, redis_client):
    # A sentinel or TLS config given with redis_key= must stay a sentinel or TLS config.
    password_file = tmp_path / "password"
    password_file.write_text("")
    sentinel = load_config(None, search=False, environ={}, overrides={
        "redis_mode": "sentinel", "sentinels": "10.0.0.1:26379", "sentinel_master": "jobs",
        "password_file": str(password_file)})
    moved = producer._config(sentinel, None, "other{q}")
    assert (moved.redis_key, moved.redis_mode, moved.sentinels, moved.sentinel_master,
            moved.password_file) == ("other{q}", "sentinel", (("10.0.0.1", 26379),), "jobs",
                                     str(password_file))
    with pytest.raises(workerpool.config.ConfigError, match="redis_key = 'two words'"):
        producer._config(sentinel, None, "two words")
    # Two configs on one URL that differ elsewhere get clients of their own.
    plain = load_config(None, search=False, environ={}, overrides={"redis_url": redis_url})
    other = plain.replace(max_payload_bytes=10)
    try:
        assert producer._sync_queue(plain) is not producer._sync_queue(other)
        assert producer._sync_queue(plain) is producer._sync_queue(plain.replace())
    finally:
        producer.close()


def test_async_enqueue(config, redis_client):
    async def produce():
        one = await workerpool.enqueue_async("x", {"n": 1}, config=config)
        many = await workerpool.enqueue_many_async([("y", {}), ("z", {})], config=config)
        return [one, *many]

    ids = asyncio.run(produce())
    assert [t["id"] for t in pending(redis_client)] == ids


def test_wait_replicas_fails_clearly_without_replicas(config, redis_client):
    # A standalone server has no replica: WAIT answers 0 and the producer must say so.
    with pytest.raises(TimeoutError, match="replicas"):
        producer.enqueue_many([("x", {})], config=config, wait_replicas=1, wait_timeout=0.2)
    assert redis_client.llen("async_tasks") == 1  # queued on the master all the same


def test_sample_script_adds_and_clears(redis_url, redis_client):
    script = os.path.join(ROOT, "scripts", "test_async_command.py")
    add = subprocess.run([sys.executable, script, "--action", "add", "--redis-url", redis_url],
                         capture_output=True, text=True, timeout=30)
    assert add.returncode == 0, add.stderr
    assert "added 3 task(s)" in add.stdout
    assert [t["type"] for t in pending(redis_client)] == ["email", "file_process", "unknown"]
    clear = subprocess.run([sys.executable, script, "--action", "clear", "--redis-url",
                            redis_url], capture_output=True, text=True, timeout=30)
    assert clear.returncode == 0 and "cleared 3" in clear.stdout
    assert redis_client.llen("async_tasks") == 0
