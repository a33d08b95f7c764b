"""Real worker processes (`python -m workerpool.worker`) against the real private redis-server.

Each test writes an INI file selecting a handler from tests/sample_handlers.py, starts the
worker as a child process (stderr to a file, so a chatty worker never blocks on a full pipe),
and checks what ended up in Redis. Every process is killed by pid at the end (`reaper`).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import refuse_writes, wait_for
from redis_server import free_port

from workerpool.protocol import QueueKeys, SyncQueue, dead_entry_task, encode_task, new_task
from workerpool.scoreboard import DURATION_BUCKETS, TYPE_COUNTERS, Scoreboard

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
Q = "async_tasks"
HOST = "testhost"
KEYS = QueueKeys(Q)
PROCESSING = KEYS.processing(HOST, "standalone")
EMPTY = {"pending": 0, "processing": 0, "retry": 0, "dead": 0}


class WorkerProcess:
    """A running `python -m workerpool.worker` and the file its stderr goes to."""

    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise AssertionError(
                f"worker did not exit within {timeout}s; its log:\n{self.output()[-3000:]}"
            ) from None

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def running(self) -> bool:
        return self.process.poll() is None


@pytest.fixture
def start_worker(reaper, tmp_path):
    """start_worker(config_path, *args) -> WorkerProcess; killed by pid at the end."""
    started: list[WorkerProcess] = []

    def start(config_path: str, *args: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERPOOL_")}
        env["PYTHONPATH"] = TESTS_DIR
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "workerpool.worker", "--config", config_path, *args],
                env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        reaper.add(process.pid)
        worker = WorkerProcess(process, log_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:  # kill survivors by pid and reap them
        if worker.running():
            worker.process.kill()
        try:
            worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def config(write_config, redis_url):
    """config(**settings) -> path of an INI for a standalone worker on the test's Redis."""

    def make(**settings: object) -> str:
        base: dict[str, object] = {
            "redis_url": redis_url,
            "handler": "sample_handlers:record",
            "host_id": HOST,
            "interval": 1,
            "log_level": "info",
        }
        base.update(settings)
        return write_config(base)

    return make


def tasks(ids, task_type: str = "t", **data: object) -> list[bytes]:
    return [encode_task(new_task(task_type, dict(data), id=str(i))) for i in ids]


def done(client) -> list[str]:
    return [item.decode() for item in client.lrange("test:done", 0, -1)]


def stamps(client, kind: str) -> list[list[str]]:
    return [item.decode().split() for item in client.lrange(f"test:{kind}", 0, -1)]


def dead_entries(client) -> list[dict]:
    return [json.loads(raw) for raw in reversed(client.lrange(KEYS.dead, 0, -1))]


# --- order, handlers, logs


def test_fifo_order_with_concurrency_1(config, start_worker, redis_client):
    ids = [str(i) for i in range(30)]
    SyncQueue(redis_client, Q).enqueue_many(tasks(ids))
    worker = start_worker(config(concurrency=1, max_tasks=30))
    assert worker.wait(20) == 0, worker.output()
    assert done(redis_client) == ids
    assert SyncQueue(redis_client, Q).counts() == EMPTY


def test_log_lines(config, start_worker, redis_client):
    SyncQueue(redis_client, Q).enqueue_many(tasks(["only"]))
    worker = start_worker(config(max_tasks=1, log_level="info"))
    assert worker.wait(20) == 0
    output = worker.output()
    assert "task done" in output
    assert "processed task #1" in output
    # The seed's line shape, each line naming the worker.
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO worker standalone: "
                     r"processed task #1$", output, re.MULTILINE), output
    assert "worker stopped (max_tasks reached): 1 processed, 0 failed" in output


def test_log_level_warning_is_quiet(config, start_worker, redis_client):
    SyncQueue(redis_client, Q).enqueue_many(tasks(["a", "b"]))
    worker = start_worker(config(max_tasks=2, log_level="warning"))
    assert worker.wait(20) == 0
    assert sorted(done(redis_client)) == ["a", "b"]
    assert "task done" not in worker.output()
    assert " INFO " not in worker.output()


def test_sync_handler_runs_concurrency_tasks_at_once(config, start_worker, redis_client):
    ids = [str(i) for i in range(8)]
    SyncQueue(redis_client, Q).enqueue_many(tasks(ids, seconds=0.4))
    worker = start_worker(config(handler="sample_handlers:sync_window", concurrency=4,
                                 max_tasks=8))
    assert worker.wait(20) == 0, worker.output()
    assert sorted(done(redis_client), key=int) == ids
    windows = [(float(start), float(end)) for _, start, end in stamps(redis_client, "windows")]
    assert len(windows) == 8

    def overlap(at: float) -> int:
        return sum(1 for start, end in windows if start <= at < end)

    peak = max(overlap(start) for start, _ in windows)
    assert peak == 4, f"expected 4 sync handlers at once, saw at most {peak}"
    span = max(end for _, end in windows) - min(start for start, _ in windows)
    assert span < 8 * 0.4 / 2, f"8 x 0.4 s with concurrency 4 took {span:.2f}s"


def test_async_handler_runs_concurrently(config, start_worker, redis_client):
    ids = [str(i) for i in range(6)]
    SyncQueue(redis_client, Q).enqueue_many(tasks(ids, seconds=0.5))
    started = time.monotonic()
    worker = start_worker(config(handler="sample_handlers:slow", concurrency=6, max_tasks=6))
    assert worker.wait(20) == 0, worker.output()
    assert sorted(done(redis_client), key=int) == ids
    # Six half-second sleeps on one event loop overlap (startup included, well under 3 s).
    assert time.monotonic() - started < 2.8
    assert SyncQueue(redis_client, Q).counts() == EMPTY


def test_latency_of_an_idle_worker(config, start_worker, redis_client):
    """A task pushed to a worker idle in its blocking take starts at once, not after interval."""
    queue = SyncQueue(redis_client, Q)
    worker = start_worker(config(handler="sample_handlers:record_time", interval=5,
                                 max_tasks=2))
    queue.enqueue_many(tasks(["warm-up"]))
    wait_for(lambda: done(redis_client) == ["warm-up"], timeout=15)
    time.sleep(0.3)  # back in its blocking take on an empty queue
    pushed = time.time()
    queue.enqueue_many(tasks(["probe"]))
    wait_for(lambda: len(done(redis_client)) == 2, timeout=6)
    started = {task_id: float(at) for task_id, at in stamps(redis_client, "times")}
    latency = started["probe"] - pushed
    assert 0 <= latency < 0.5, f"task started {latency:.3f}s after it was pushed"
    assert worker.wait(10) == 0


# --- malformed input


def test_malformed_tasks_are_dead_lettered_and_the_worker_goes_on(config, start_worker,
                                                                  redis_client):
    too_large = encode_task(new_task("t", {"blob": "x" * 400}, id="big"))
    malformed = [
        (b'\xff\xfe{"type": "t"}', "invalid_utf8"),
        (b'{"type": "t", "data": ', "invalid_json"),
        (b'["type", "t"]', "not_an_object"),
        (b'{"data": {}, "id": "no-type"}', "bad_type"),
        (b'{"type": 42, "id": "int-type"}', "bad_type"),
        (too_large, "too_large"),
    ]
    sequence: list[bytes] = []
    valid_ids = []
    for index, (raw, _) in enumerate(malformed):
        valid_ids.append(f"v{index}")
        sequence += tasks([f"v{index}"])
        sequence.append(raw)
    valid_ids.append("last")
    sequence += tasks(["last"])
    SyncQueue(redis_client, Q).enqueue_many(sequence)

    worker = start_worker(config(max_payload_bytes=300, concurrency=1,
                                 max_tasks=len(sequence)))
    assert worker.wait(20) == 0, worker.output()
    assert done(redis_client) == valid_ids  # in order, none skipped
    entries = dead_entries(redis_client)
    assert [entry["reason"] for entry in entries] == [reason for _, reason in malformed]
    for entry, (raw, _) in zip(entries, malformed, strict=True):
        assert dead_entry_task(entry) == raw  # exact bytes kept, even invalid UTF-8
        assert entry["error"]
        assert (entry["host"], entry["worker"], entry["attempts"]) == (HOST, "standalone", 0)
    assert "task_base64" in entries[0]
    assert SyncQueue(redis_client, Q).counts() == {**EMPTY, "dead": len(malformed)}
    output = worker.output()
    assert output.count("invalid task dead-lettered") == len(malformed)
    assert "worker stopped (max_tasks reached)" in output


# --- failures, retries, timeouts


def test_retry_timing_then_dead_with_max_retries(config, start_worker, redis_client):
    SyncQueue(redis_client, Q).enqueue_many(tasks(["f"], failures=100))
    worker = start_worker(config(handler="sample_handlers:flaky_timed", retry_backoff=0.2,
                                 max_retries=2, interval=5, max_tasks=1))
    assert worker.wait(20) == 0, worker.output()

    starts = stamps(redis_client, "starts")
    assert [attempts for _, attempts, _ in starts] == ["0", "1", "2"]  # ran 3 times
    times = [float(at) for _, _, at in starts]
    for attempt, (before, after) in enumerate(zip(times, times[1:], strict=False), start=1):
        step = 0.2 * 2 ** (attempt - 1)
        gap = after - before
        # The backoff's lower bound is 0.5 x step; a due retry is picked up promptly
        # (a timer, not the 5 s interval or the 1 s sweep).
        assert 0.5 * step <= gap < step + 0.8, f"gap {attempt}: {gap:.3f}s for step {step}"
    assert done(redis_client) == []

    [entry] = dead_entries(redis_client)
    assert entry["reason"] == "max_retries"
    assert entry["attempts"] == 3
    assert entry["error"] == "RuntimeError: planned failure on attempt 3"
    # The dead task is the last delivery, with attempts grown to 2 (failures before it).
    task = json.loads(dead_entry_task(entry))
    assert (task["id"], task["attempts"]) == ("f", 2)
    assert SyncQueue(redis_client, Q).counts() == {**EMPTY, "dead": 1}


def test_a_task_that_succeeds_on_a_retry_is_done_once(config, start_worker, redis_client):
    ids = ["a", "b", "c"]
    SyncQueue(redis_client, Q).enqueue_many(tasks(ids, failures=1))
    worker = start_worker(config(handler="sample_handlers:flaky_timed", retry_backoff=0.05,
                                 max_retries=3, max_tasks=3))
    assert worker.wait(20) == 0, worker.output()
    assert sorted(done(redis_client)) == ids
    starts = stamps(redis_client, "starts")
    assert sorted((task_id, attempts) for task_id, attempts, _ in starts) == [
        (task_id, attempts) for task_id in ids for attempts in ("0", "1")
    ]
    assert SyncQueue(redis_client, Q).counts() == EMPTY
    assert "worker stopped (max_tasks reached): 3 processed, 3 failed" in worker.output()


def test_task_timeout(config, start_worker, redis_client):
    SyncQueue(redis_client, Q).enqueue_many(tasks(["sleepy"], seconds=30))
    began = time.monotonic()
    worker = start_worker(config(handler="sample_handlers:slow", task_timeout=0.3,
                                 max_retries=0, max_tasks=1))
    assert worker.wait(15) == 0, worker.output()
    assert time.monotonic() - began < 10
    assert redis_client.lrange("test:started", 0, -1) == [b"sleepy"]
    assert done(redis_client) == []
    [entry] = dead_entries(redis_client)
    assert entry["reason"] == "max_retries"
    assert "timed out" in entry["error"]
    assert entry["error"] == "TimeoutError: timed out after 0.3s"
    assert SyncQueue(redis_client, Q).counts() == {**EMPTY, "dead": 1}


# --- drain, crash, requeue


def test_sigterm_drains_in_flight_tasks(config, start_worker, redis_client):
    queue = SyncQueue(redis_client, Q)
    ids = [str(i) for i in range(7)]
    queue.enqueue_many(tasks(ids, seconds=1.0))
    worker = start_worker(config(handler="sample_handlers:slow", concurrency=3, interval=5))
    wait_for(lambda: redis_client.llen("test:started") == 3, timeout=15)
    assert queue.counts()["pending"] == 4
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.output()
    assert time.monotonic() - sent < 5
    # The three in flight finished; nothing else was taken.
    assert sorted(done(redis_client), key=int) == ["0", "1", "2"]
    assert redis_client.llen("test:started") == 3
    assert queue.counts() == {**EMPTY, "pending": 4}
    assert redis_client.exists(PROCESSING) == 0
    assert [json.loads(raw)["id"] for raw in reversed(redis_client.lrange(Q, 0, -1))] == ids[3:]
    output = worker.output()
    assert "draining (SIGTERM): 3 task(s) in flight" in output
    assert "worker stopped (SIGTERM): 3 processed, 0 failed" in output


def test_sigterm_on_an_idle_worker_exits_at_once(config, start_worker, redis_client):
    worker = start_worker(config(interval=30))
    wait_for(lambda: "starting worker" in worker.output(), timeout=15)
    time.sleep(0.3)  # in its blocking take
    sent = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0, worker.output()
    assert time.monotonic() - sent < 3, "a blocked take must not delay the drain"
    assert SyncQueue(redis_client, Q).counts() == EMPTY


@pytest.mark.parametrize("recovery", ["SyncQueue.requeue", "restart with the same worker id"])
def test_sigkill_leaves_the_task_in_processing_until_requeued(
    recovery, config, start_worker, redis_client
):
    queue = SyncQueue(redis_client, Q)
    [raw] = tasks(["victim"], seconds=1.0)
    queue.enqueue_many([raw])
    path = config(handler="sample_handlers:slow", max_tasks=1)
    first = start_worker(path)
    wait_for(lambda: redis_client.llen("test:started") == 1, timeout=15)
    first.signal(signal.SIGKILL)
    assert first.wait(5) == -signal.SIGKILL
    # At-least-once: the task is neither lost nor done; it waits in the dead worker's list.
    assert redis_client.lrange(PROCESSING, 0, -1) == [raw]
    assert queue.counts() == {**EMPTY, "processing": 1}
    assert done(redis_client) == []

    if recovery == "SyncQueue.requeue":
        assert queue.requeue(PROCESSING, max_deliveries=3) == (1, 0)
        assert queue.counts() == {**EMPTY, "pending": 1}
        assert int(redis_client.hget(KEYS.deliveries, raw)) == 1
        second = start_worker(path, "--worker-id", "other")
    else:
        second = start_worker(path)
    assert second.wait(20) == 0, second.output()
    assert done(redis_client) == ["victim"]
    assert redis_client.llen("test:started") == 2
    assert queue.counts() == EMPTY
    assert redis_client.exists(KEYS.deliveries) == 0  # the ack forgot the delivery count
    if recovery != "SyncQueue.requeue":
        assert "requeued 1 task(s) left by a previous run (0 dead-lettered)" in second.output()


def test_redis_restart_mid_run_loses_nothing(make_redis_server, write_config, start_worker):
    password = "hunter2-secret"  # the logs of the outage must not show it
    # The pool logs in as a user with a password (the fixture's own checks use the default).
    server = make_redis_server(appendonly=True,
                               extra_args=("--user", "pool", "on", f">{password}", "~*", "&*",
                                           "+@all"))
    client = server.client()
    try:
        queue = SyncQueue(client, Q)
        ids = [str(i) for i in range(300)]
        queue.enqueue_many(tasks(ids, seconds=0.01))
        worker = start_worker(write_config({
            "redis_url": f"redis://pool:{password}@127.0.0.1:{server.port}/0",
            "handler": "sample_handlers:sync_record",
            "host_id": HOST, "concurrency": 2, "interval": 1, "retry_backoff": 0.1,
            "max_retries": 20, "log_level": "info",
        }))
        wait_for(lambda: client.llen("test:done") >= 40, timeout=20)
        server.stop()
        time.sleep(1.0)
        assert worker.running(), "the worker must survive an outage\n" + worker.output()
        server.start()

        def all_done() -> bool:
            try:
                finished = set(done(client))
                return finished == set(ids) and queue.counts() == EMPTY
            except Exception:  # noqa: BLE001 - reconnecting
                return False

        wait_for(all_done, timeout=40, step=0.1)
        assert worker.running(), worker.output()
        output = worker.output()
        assert f"redis unavailable at redis://pool:***@127.0.0.1:{server.port}/0" in output
        assert password not in output
        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == 0, output
        assert queue.counts() == EMPTY
        assert set(done(client)) == set(ids)
        assert "Traceback" not in worker.output()
    finally:
        client.close()


def test_redis_restart_with_results_waiting_to_be_written(make_redis_server, write_config,
                                                          start_worker, tmp_path):
    """Results finished while Redis is down are written when it is back, and the tasks behind
    them are not given back and run again: exactly once here, and max_tasks is exact."""
    server = make_redis_server(appendonly=True)
    client = server.client()
    results = tmp_path / "results.txt"
    results.touch()
    try:
        queue = SyncQueue(client, Q)
        ids = [str(i) for i in range(300)]
        queue.enqueue_many(tasks(ids, seconds=0.02, file=str(results)))
        worker = start_worker(write_config({
            "redis_url": server.url, "handler": "sample_handlers:file_record",
            "host_id": HOST, "concurrency": 8, "interval": 1, "max_tasks": 300,
            "log_level": "warning",
        }))
        wait_for(lambda: len(results.read_text().split()) >= 60, timeout=20)
        server.stop()
        time.sleep(1.0)
        server.start()
        assert worker.wait(30) == 0, worker.output()
        finished = results.read_text().split()
        assert sorted(finished, key=int) == ids, worker.output()
        assert queue.counts() == EMPTY
        assert "redis unavailable" in worker.output()
    finally:
        client.close()


# --- start-up failures


def test_redis_unreachable_at_start_exits_1_and_masks_the_password(
    write_config, start_worker
):
    port = free_port()
    url = f"redis://:secret@127.0.0.1:{port}/0"
    worker = start_worker(write_config({"redis_url": url, "handler": "sample_handlers:record"}))
    assert worker.wait(20) == 1
    output = worker.output()
    assert f"redis://:***@127.0.0.1:{port}/0" in output
    assert "secret" not in output


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"concurrency": 0}, "concurrency = '0'"),
        ({"interval": "soon"}, "interval = 'soon'"),
        ({"handler": "no_such_module_here:run"}, "cannot import no_such_module_here"),
        ({"handler": "sample_handlers:missing"}, "has no attribute missing"),
        ({"max_retries": -1}, "max_retries"),
        ({"no_such_key": 1}, "unknown key"),
    ],
)
def test_invalid_config_exits_2(settings, expected, config, start_worker):
    worker = start_worker(config(**settings))
    assert worker.wait(20) == 2
    output = worker.output()
    assert "config error" in output
    assert expected in output


def test_missing_config_file_exits_2(start_worker, tmp_path):
    worker = start_worker(str(tmp_path / "nowhere.ini"))
    assert worker.wait(20) == 2
    assert "config file not found" in worker.output()


# --- the "Done when" scenario


def test_done_when_2000_valid_and_20_malformed(config, start_worker, redis_client):
    rng = random.Random(2020)
    valid = [str(i) for i in range(2000)]
    kinds = [
        b"\xc3\x28 not utf-8",
        b"{broken json",
        b"[1, 2, 3]",
        b'{"data": {"no": "type"}}',
        b'{"type": {"nested": true}}',
    ]
    bad = [kinds[i % len(kinds)] for i in range(20)]  # identical raws too
    sequence = tasks(valid)
    for raw in bad:
        sequence.insert(rng.randrange(len(sequence) + 1), raw)
    SyncQueue(redis_client, Q).enqueue_many(sequence)

    worker = start_worker(config(max_tasks=2020, concurrency=50, log_level="warning"))
    assert worker.wait(45) == 0, worker.output()[-3000:]
    finished = done(redis_client)
    assert len(finished) == 2000
    assert set(finished) == set(valid)  # every valid id exactly once
    entries = dead_entries(redis_client)
    assert len(entries) == 20
    assert sorted(entry["reason"] for entry in entries) == sorted(
        ["invalid_utf8"] * 4 + ["invalid_json"] * 4 + ["not_an_object"] * 4 + ["bad_type"] * 8
    )
    assert sorted(dead_entry_task(entry) for entry in entries) == sorted(bad)
    assert SyncQueue(redis_client, Q).counts() == {**EMPTY, "dead": 20}


# --- handlers that misbehave: the task is failed (and retried), never stuck or lost


@pytest.mark.parametrize("how", ["cancel_self", "mutate", "system_exit", "retry_nan"])
def test_a_misbehaving_handler_fails_its_task_and_the_worker_goes_on(
        how, config, start_worker, redis_client):
    queue = SyncQueue(redis_client, Q)
    queue.enqueue_many(tasks(["bad"], "odd", how=how) + tasks(["good"], how="fine"))
    worker = start_worker(config(handler="sample_handlers:misbehave", max_retries=1,
                                 retry_backoff=0.05, max_tasks=2))
    assert worker.wait(20) == 0, worker.output()
    assert done(redis_client) == ["good"]
    (entry,) = dead_entries(redis_client)
    assert entry["reason"] == "max_retries" and entry["attempts"] == 2
    # Retried from the original bytes: the handler's changes to its dict do not leak.
    assert json.loads(entry["task"])["type"] == "odd"
    assert [i.decode() for i in redis_client.lrange("test:started", 0, -1)].count("bad") == 2
    assert queue.counts() == {**EMPTY, "dead": 1}


def test_a_stuck_sync_handler_stops_the_worker_and_its_task_runs_again_later(
        config, start_worker, redis_client):
    queue = SyncQueue(redis_client, Q)
    queue.enqueue_many(tasks(["stuck"]))
    ini = config(handler="sample_handlers:sync_stuck", task_timeout=0.3, drain_timeout=5)
    first = start_worker(ini)
    assert first.wait(20) == 3, first.output()  # the thread could not be stopped: exit
    assert "sync handler still running after task_timeout" in first.output()
    # It was not given back while its thread still ran: it is in the processing list, and
    # the thread never finished it.
    assert redis_client.lrange(PROCESSING, 0, -1) != [] and done(redis_client) == []
    second = start_worker(ini)  # requeues what its predecessor left, and runs it
    wait_for(lambda: done(redis_client) == ["stuck"])
    second.signal(signal.SIGTERM)
    assert second.wait(20) == 0
    assert queue.counts() == EMPTY


# --- tasks that used to wedge or crash a worker


def deep_task(task_id: str, depth: int) -> bytes:
    return (b'{"type":"t","id":"' + task_id.encode() + b'","data":' + b"[" * depth
            + b"]" * depth + b"}")


def test_a_task_too_deep_for_repr_still_runs_and_settles(config, start_worker, redis_client):
    """orjson decodes ~1000 levels of nesting, deeper than repr() can go: logging the task
    must not kill its run before it settles (its slot, in_flight and processing entry would
    leak, and with concurrency 1 the worker would take nothing more)."""
    queue = SyncQueue(redis_client, Q)
    queue.enqueue_many([deep_task("deep", 1020)] + tasks(["after"]))
    worker = start_worker(config(concurrency=1, max_tasks=2, log_level="info"))
    assert worker.wait(20) == 0, worker.output()[-3000:]
    assert done(redis_client) == ["deep", "after"]
    assert queue.counts() == EMPTY
    output = worker.output()
    assert "nested too deeply to show" in output
    assert "RecursionError" not in output


def test_without_orjson_a_task_too_deep_to_decode_is_dead_lettered(config, start_worker,
                                                                    redis_client, tmp_path):
    """The stdlib decoder raises RecursionError, not ValueError: still an invalid task, not a
    crash (which gave the raw back uncounted, so every restart crashed on it again)."""
    # The worker runs in tmp_path, first on its sys.path: this shadows the real orjson.
    (tmp_path / "orjson.py").write_text('raise ImportError("no orjson in this test")\n')
    deep = deep_task("deep", 100_000)
    queue = SyncQueue(redis_client, Q)
    queue.enqueue_many([deep] + tasks(["after"]))
    worker = start_worker(config(concurrency=1, max_tasks=2, max_payload_bytes=len(deep)))
    assert worker.wait(20) == 0, worker.output()[-3000:]
    assert done(redis_client) == ["after"]
    [entry] = dead_entries(redis_client)
    assert entry["reason"] == "invalid_json"
    assert "recursion" in entry["error"]  # the stdlib decoder's error: orjson was not used
    assert dead_entry_task(entry) == deep
    assert queue.counts() == {**EMPTY, "dead": 1}


# --- results Redis refuses for a while


GATED_HANDLERS = """
import asyncio
import os


async def gated(task):
    # Wait for the file data.gate to exist, then append the id to data.file (no Redis).
    while not os.path.exists(task["data"]["gate"]):
        await asyncio.sleep(0.01)
    with open(task["data"]["file"], "a", encoding="utf-8") as out:
        out.write(task["id"] + "\\n")
"""


def test_results_refused_for_lack_of_memory_are_written_later(make_redis_server, write_config,
                                                              start_worker, tmp_path):
    """maxmemory + noeviction: SETTLE fails with OOM (a ResponseError) until memory is freed.
    That is temporary: the results are kept and sent again. Nothing is lost, nothing runs
    twice, and max_tasks counts exactly the tasks finished."""
    (tmp_path / "gated_handlers.py").write_text(GATED_HANDLERS)
    gate, results = tmp_path / "gate", tmp_path / "results.txt"
    results.touch()
    server = make_redis_server(extra_args=("--maxmemory-policy", "noeviction"))
    client = server.client()
    try:
        queue = SyncQueue(client, Q)
        ids = [str(i) for i in range(8)]
        queue.enqueue_many(tasks(ids, gate=str(gate), file=str(results)))
        worker = start_worker(write_config({
            "redis_url": server.url, "handler": "gated_handlers:gated", "host_id": HOST,
            "concurrency": 6, "max_tasks": 6, "interval": 1, "log_level": "info",
        }))
        wait_for(lambda: client.llen(PROCESSING) == 6, timeout=15)
        refuse_writes(client)
        gate.touch()  # the six handlers finish; their results cannot be written
        wait_for(lambda: len(results.read_text().split()) == 6, timeout=10)
        wait_for(lambda: worker.output().count("maxmemory") >= 2, timeout=10)  # sent again
        assert worker.running(), worker.output()
        assert client.llen(PROCESSING) == 6  # nothing acked, nothing given back
        client.config_set("maxmemory", 0)
        assert worker.wait(20) == 0, worker.output()
        finished = results.read_text().split()
        assert sorted(finished, key=int) == ids[:6], finished  # each once
        assert queue.counts() == {**EMPTY, "pending": 2}
        assert "worker stopped (max_tasks reached): 6 processed, 0 failed" in worker.output()
    finally:
        client.close()


# --- suspects: run alone, by an idle worker


def test_a_busy_worker_blocked_in_its_take_does_not_run_a_suspect(config, start_worker,
                                                                  redis_client, tmp_path):
    """A task whose worker died is a suspect, to run alone. A busy worker waiting in BLMOVE
    on an empty queue receives one like any task: it gives it back and takes it when idle."""
    queue = SyncQueue(redis_client, Q)
    gate = tmp_path / "gate"
    worker = start_worker(config(handler="sample_handlers:gated", concurrency=2, interval=5))
    queue.enqueue_many(tasks(["long"], gate=str(gate)))
    wait_for(lambda: redis_client.lrange("test:started", 0, -1) == [b"long"], timeout=15)
    # Busy with "long", and blocked in its take on the empty queue:
    wait_for(lambda: any(client.get("cmd") == "blmove" for client in redis_client.client_list()),
             timeout=10)
    [suspect] = tasks(["suspect"], gate=str(gate))
    redis_client.hset(KEYS.deliveries, suspect, 1)  # as REQUEUE leaves a dead worker's task
    redis_client.rpush(Q, suspect)  # at the consuming end, as REQUEUE gives it back
    wait_for(lambda: "waits until this worker is idle" in worker.output(), timeout=10)
    assert redis_client.lrange("test:started", 0, -1) == [b"long"], "the suspect ran beside"
    assert redis_client.lrange(Q, 0, -1) == [suspect]  # given back, still a suspect
    gate.touch()
    wait_for(lambda: done(redis_client) == ["long", "suspect"], timeout=10)
    assert redis_client.lrange("test:started", 0, -1) == [b"long", b"suspect"]  # once each
    assert queue.counts() == EMPTY
    assert redis_client.exists(KEYS.deliveries) == 0
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.output()


# --- drain_timeout with a sync handler


def test_a_sync_task_cut_off_by_drain_timeout_is_not_given_back_while_its_thread_runs(
        config, start_worker, redis_client):
    """A sync handler's thread cannot be stopped: at drain_timeout its task stays in the
    processing list (requeued once the process is gone), as for a stuck handler."""
    queue = SyncQueue(redis_client, Q)
    [raw] = tasks(["stuck"])
    queue.enqueue_many([raw])
    ini = config(handler="sample_handlers:sync_stuck", drain_timeout=0.3)
    first = start_worker(ini)
    wait_for(lambda: redis_client.lrange("test:started", 0, -1) == [b"stuck"], timeout=15)
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0, first.output()
    assert "drain_timeout (0.3s) reached" in first.output()
    assert redis_client.lrange(PROCESSING, 0, -1) == [raw]  # not in the queue for others
    assert queue.counts() == {**EMPTY, "processing": 1}
    assert done(redis_client) == []  # the thread died with its process
    second = start_worker(ini)  # requeues what its predecessor left, and runs it
    wait_for(lambda: done(redis_client) == ["stuck"], timeout=15)
    assert "requeued 1 task(s) left by a previous run" in second.output()
    second.signal(signal.SIGTERM)
    assert second.wait(15) == 0
    assert queue.counts() == EMPTY


# --- metrics in shared memory


def test_metrics_of_the_empty_task_type_do_not_hide_the_types_after_it():
    scoreboard = Scoreboard(1)
    try:
        counters = {name: [index + 1] * len(TYPE_COUNTERS)
                    for index, name in enumerate(["email", "", "report"])}
        scoreboard.publish_metrics(0, counters, [0] * len(DURATION_BUCKETS), 0.5)
        by_type, _, duration_sum = scoreboard.read_metrics(0)
        assert by_type == counters
        assert duration_sum == 0.5
        scoreboard.clear_slot(0)
        assert scoreboard.read_metrics(0)[0] == {}
    finally:
        scoreboard.close()
