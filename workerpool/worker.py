"""One worker process: an asyncio loop that takes tasks from the queue and runs the handler.

Run alone with `python -m workerpool.worker --config FILE`, or forked by the supervisor.
The fetch loop takes as many tasks as there is free concurrency (and max-tasks budget) in one
round trip, and blocks on BLMOVE for up to `interval` only when the queue is empty, so a task
pushed to an idle worker starts at once. Finished deliveries are coalesced into one script
call per loop iteration. Redis errors are survived: the worker backs off, reconnects and then
gives back anything a lost reply left in its processing list.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import concurrent.futures
import functools
import gc
import inspect
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError, ResponseError
from setproctitle import setproctitle  # a hard dependency: titles hide passwords

from workerpool import protocol
from workerpool.config import Config, ConfigError, load_config, load_handler
from workerpool.connection import async_client, blocking_margin, describe
from workerpool.errors import RetryLater, TaskRejected
from workerpool.logs import set_process_name, setup_logging
from workerpool.protocol import AsyncQueue, InvalidTask, Settlement, decode_task
from workerpool.scoreboard import (
    BUSY,
    DRAINING,
    DURATION_BUCKETS,
    IDLE,
    OTHER_TYPES,
    STOPPED,
    TYPE_COUNTERS,
    Scoreboard,
)

log = logging.getLogger("workerpool.worker")

TAKEN, SUCCEEDED, FAILED, RETRIED, DEAD = (TYPE_COUNTERS.index(name) for name in (
    "taken", "succeeded", "failed", "retried", "dead"))
INVALID_TYPE = "(invalid)"  # the type label of raws that are not tasks
MAX_TYPES = 256  # task types counted apart; the rest are counted as OTHER_TYPES

EXIT_ABANDONED = 3  # a sync handler was stuck past task_timeout (counts as a crash)
RECONNECT_MIN = 0.1
RECONNECT_MAX = 1.0  # Redis back after a failover: resume within a second
HOUSEKEEPING_PERIOD = 1.0
# How long a worker keeps trying to write its last results before it gives up on Redis
# (what it could not write stays in its processing list and is requeued).
FINAL_FLUSH_TIMEOUT = 10.0


def _is_async(handler: Callable[..., Any]) -> bool:
    target = handler
    while isinstance(target, functools.partial):
        target = target.func
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - an async __call__ method counts
    )


def _short(task: Any, limit: int = 200) -> str:
    try:
        text = repr(task)
    except RecursionError:  # JSON nested deeper than repr() can go (orjson decodes ~1000 deep)
        return f"<{type(task).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Worker:
    """The asyncio side of one worker process."""

    def __init__(
        self,
        config: Config,
        handler: Callable[[dict], Any],
        scoreboard: Scoreboard,
        index: int,
        *,
        name: str | None = None,
        list_id: str | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.handler_is_async = _is_async(handler)
        self.scoreboard = scoreboard
        self.index = index
        self.name = name or str(index)
        self.parent_pid = parent_pid
        self.host = config.host_name
        # Supervised workers add their pid, so a list is never shared by two live processes.
        self.list_id = list_id or self.name
        self.processing_key = protocol.QueueKeys(config.redis_key).processing(
            self.host, self.list_id
        )
        self.stopping = False
        self.stop_reason = ""
        self.in_flight = 0
        self.processed = 0  # finished for good (acked or dead-lettered), as written to Redis
        self.succeeded = 0
        self.failed = 0
        # Raws this worker holds in its processing list, by delivery number.
        self.held: dict[int, bytes] = {}
        self._delivery_seq = 0
        self._running: dict[int, asyncio.Task] = {}
        # (deadline, last delivery) of each started batch still running, oldest first.
        self._deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self._timed_out: set[int] = set()
        self._isolated: int | None = None  # the suspect delivery running alone, if any
        self._drain_cancelled: set[int] = set()  # deliveries cancelled at drain_timeout
        self._abandoned: list[bytes] = []  # raws of stuck sync handlers: not to be given back
        self.exit_code = 0
        # Metrics, published to shared memory about once a second: by task type, the
        # counters of scoreboard.TYPE_COUNTERS, and a histogram of handler durations.
        self._type_counts: dict[str, list[int]] = {}
        self._histogram = [0] * len(DURATION_BUCKETS)
        self._duration_sum = 0.0
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._new_task = self._task_factory()
        self._pending = Settlement()
        self._pending_counts = [0, 0, 0]  # finished, returned, failed in self._pending
        self._writing: Settlement | None = None  # the settlement _flush is writing now
        self._flushing: asyncio.Task | None = None
        self._flush_scheduled = False
        self._slot_freed = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._needs_reconcile = False
        self._redis_down_since: float | None = None
        self._fetch_task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._log_tasks = log.isEnabledFor(logging.INFO)
        recycle_after = config.max_tasks_per_worker
        if recycle_after:
            # Jitter so that workers started together do not all recycle at once.
            recycle_after += random.randint(0, max(1, recycle_after // 10))
        self.recycle_after = recycle_after
        self.queue: AsyncQueue | None = None

    # --- life cycle

    async def run(self) -> int:
        """Run until stopped, max_tasks is reached or the worker is recycled; the exit code."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        command = async_client(self.config)
        blocking = async_client(self.config, blocking_timeout=blocking_margin(self.config.interval))
        self.queue = AsyncQueue(command, self.config.redis_key, blocking_client=blocking)
        if not self.handler_is_async:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.config.concurrency, thread_name_prefix="handler"
            )
        self.scoreboard.set(self.index, "state", IDLE)
        self.scoreboard.beat(self.index)
        housekeeping = loop.create_task(self._housekeeping())
        self._fetch_task = loop.create_task(self._fetch_loop())
        self._fetch_task.add_done_callback(self._fetch_ended)
        try:
            await self._stop_event.wait()
            await self._drain()
        finally:
            housekeeping.cancel()
            self.publish_metrics()
            self.scoreboard.set(self.index, "state", STOPPED)
            self.scoreboard.set(self.index, "in_flight", 0)
            for client in (command, blocking):
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001 - closing a broken connection may fail
                    pass
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker stopped (%s): %d processed, %d failed",
                 self.stop_reason or "stopped", self.processed, self.failed)
        return self.exit_code

    def _fetch_ended(self, task: asyncio.Task) -> None:
        # The fetch loop only ends when stopping; anything else is a bug: do not linger on,
        # beating the heartbeat while taking nothing.
        if not task.cancelled() and task.exception() is not None:
            log.error("fetch loop failed: %r", task.exception(), exc_info=task.exception())
            self.exit_code = 1
            self.stop("internal error")
    def stop(self, reason: str) -> None:
        """Begin a graceful drain: take nothing more, finish what runs, exit."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        self.scoreboard.set(self.index, "state", DRAINING)
        log.info("draining (%s): %d task(s) in flight", reason, self.in_flight)
        self._slot_freed.set()
        if self._fetch_task is not None and not self._fetch_task.done():
            self._fetch_task.cancel()
        self._stop_event.set()

    async def _drain(self) -> None:
        if self._fetch_task is not None:
            try:
                await self._fetch_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already logged
                pass
        running = list(self._running.values())
        if running:
            done, not_done = await asyncio.wait(running, timeout=self.config.drain_timeout)
            if not_done:
                log.warning("drain_timeout (%gs) reached: %d unfinished task(s) go back to the "
                            "queue%s", self.config.drain_timeout, len(not_done),
                            "" if self.handler_is_async else " once this process is gone")
                for delivery, task in list(self._running.items()):
                    if task in not_done:
                        self._drain_cancelled.add(delivery)
                        task.cancel()
                await asyncio.wait(not_done, timeout=1.0)
        await self._final_flush()

    async def _final_flush(self) -> None:
        deadline = time.monotonic() + FINAL_FLUSH_TIMEOUT
        while True:
            if self._flushing is not None and not self._flushing.done():
                # _flush retries until Redis answers: wait for it no longer than the deadline.
                await asyncio.wait({self._flushing}, timeout=max(0, deadline - time.monotonic()))
            if len(self._pending) == 0 and (self._flushing is None or self._flushing.done()):
                break
            if time.monotonic() > deadline:
                if self._flushing is not None:
                    self._flushing.cancel()
                log.error("could not write %d result(s) to Redis; they stay in %s and will be "
                          "requeued", len(self._pending) + len(self._writing or ()),
                          self.processing_key)
                return
            if self._flushing is None or self._flushing.done():
                self._flushing = self.loop.create_task(self._flush())
            await asyncio.sleep(0)
        # Whatever is still in the processing list was taken but never run (a take cancelled
        # mid-flight, or a task given back at drain_timeout): return it to the queue - all
        # but the tasks of stuck sync handlers, which are requeued once this process is gone.
        while time.monotonic() < deadline:
            try:
                given_back = await self.queue.release_unknown(self.processing_key,
                                                              self._abandoned)
                if given_back:
                    log.info("gave back %d task(s) not started", given_back)
                return
            except RedisError as exc:
                log.error("redis unavailable while giving back tasks (%s)", exc)
                await asyncio.sleep(0.5)

    # --- fetching

    async def _fetch_loop(self) -> None:
        concurrency = self.config.concurrency
        scoreboard = self.scoreboard
        index = self.index
        queue = self.queue
        key = self.processing_key
        backoff = RECONNECT_MIN
        # The last blocking take timed out: the queue stayed empty for a whole interval, so
        # block again at once rather than spend a round trip on a batch take first.
        idle = False
        while not self.stopping:
            free = concurrency - self.in_flight
            if free <= 0 or self._isolated is not None:
                # A suspect runs alone: if it kills this worker, it is the only task blamed.
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            if self.recycle_after:
                free = min(free, max(0, self.recycle_after - self.processed - self.in_flight))
                if free == 0:
                    await self._wait_for_slot()
                    continue
            granted = scoreboard.reserve(index, free)
            if granted == 0:
                if scoreboard.budget_spent():
                    self.stop("max_tasks reached")
                    return
                await self._wait_for_slot(0.05)
                continue
            items: list[bytes] = []
            flag = protocol.TAKEN
            blocked = False
            try:
                if self._needs_reconcile:
                    await self._reconcile()
                if not idle:
                    items, flag = await queue.take_batch(key, granted, self.in_flight == 0)
                if not items and flag != protocol.WAIT_IDLE:
                    scoreboard.release(index, granted - 1)
                    granted = 1
                    raw = await queue.take_blocking(key, self.config.interval)
                    busy = self.in_flight > 0
                    if raw is not None and busy and await queue.is_suspect(raw):
                        # BLMOVE cannot refuse a suspect to a busy worker as TAKE does: give
                        # it back to be taken alone by an idle worker (this one, later).
                        await queue.give_back(key, raw)
                        log.info("a task whose worker died waits until this worker is idle: "
                                 "it runs alone")
                        flag = protocol.WAIT_IDLE
                    elif raw is not None:
                        items = [raw]
                        # Idle: start it at once and ask whether it is a suspect after.
                        blocked = not busy
                idle = not items and flag != protocol.WAIT_IDLE
                backoff = RECONNECT_MIN
                if self._redis_down_since is not None:
                    log.warning("redis reachable again after %.1fs",
                                time.monotonic() - self._redis_down_since)
                    self._redis_down_since = None
            except asyncio.CancelledError:
                scoreboard.release(index, granted)
                raise
            except RedisError as exc:
                scoreboard.release(index, granted)
                idle = False
                self._connection_lost(exc, backoff)
                await self._wait_for_slot(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)
                continue
            if flag == protocol.WAIT_IDLE:
                # The oldest task is a suspect, for an idle worker to take: finish ours.
                scoreboard.release(index, granted)
                await self._wait_for_slot(0.05)
                continue
            if len(items) < granted:
                scoreboard.release(index, granted - len(items))
            if items:
                self._start_batch(items)
                # Let the handlers just scheduled start before the next round trip is sent:
                # the write would otherwise delay them (enqueue-to-start latency when idle).
                await asyncio.sleep(0)
                if blocked:  # a blocking take cannot say whether it took a suspect: ask
                    try:
                        flag = protocol.SUSPECT if await queue.is_suspect(items[0]) else flag
                    except RedisError:
                        pass  # the next take finds out about the connection
                if flag == protocol.SUSPECT and self._delivery_seq in self._running:
                    self._isolated = self._delivery_seq

    async def _wait_for_slot(self, timeout: float = 1.0) -> None:
        self._slot_freed.clear()
        try:
            await asyncio.wait_for(self._slot_freed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _connection_lost(self, exc: Exception, backoff: float) -> None:
        self._needs_reconcile = True
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
        log.error("redis unavailable at %s (%s: %s); retrying in %.1fs",
                  describe(self.config), type(exc).__name__, exc, backoff)

    async def _reconcile(self) -> None:
        # Finished deliveries whose result is not written yet are still in the list, rightly.
        known = list(self.held.values())
        for settlement in (self._pending, self._writing):
            if settlement is not None:
                known += settlement.acks + settlement.records[1::4]
        released = await self.queue.release_unknown(self.processing_key, known)
        self._needs_reconcile = False
        if released:
            log.warning("gave back %d task(s) taken during a lost connection", released)

    # --- running tasks

    def _task_factory(self) -> Callable[[Any], asyncio.Task]:
        """Start handler runs eagerly where asyncio can (3.12+): a handler that finishes
        without waiting never goes through the scheduler."""
        if sys.version_info >= (3, 12):
            def eager(coro: Any) -> asyncio.Task:
                return asyncio.Task(coro, loop=self.loop, eager_start=True)

            return eager
        return lambda coro: self.loop.create_task(coro)

    def _start_batch(self, items: list[bytes]) -> None:
        """Start one handler run per taken raw (dead-letter the ones that are not tasks)."""
        held = self.held
        running = self._running
        max_payload = self.config.max_payload_bytes
        run = self._run
        new_task = self._new_task
        timeout = self.config.task_timeout
        deadline = time.monotonic() + timeout
        if self.in_flight == 0:
            self.scoreboard.set(self.index, "busy_since", time.monotonic())
            self.scoreboard.set(self.index, "state", BUSY)
        if timeout:
            # Forget the batches that have all finished (every delivery older than the oldest
            # one still running): one entry per batch, so this stays as small as what runs.
            deadlines = self._deadlines
            oldest = next(iter(running), None)
            while deadlines and (oldest is None or deadlines[0][1] < oldest):
                deadlines.popleft()
        for raw in items:
            self._delivery_seq += 1
            delivery = self._delivery_seq
            held[delivery] = raw
            try:
                task = decode_task(raw, max_payload)
            except InvalidTask as exc:
                self._dead_letter_invalid(delivery, raw, exc.reason, exc.detail)
                continue
            except Exception as exc:  # noqa: BLE001 - a decoder's surprise must not stop the pool
                self._dead_letter_invalid(delivery, raw, "undecodable",
                                          f"{type(exc).__name__}: {exc}")
                continue
            self.in_flight += 1
            running_task = new_task(run(delivery, raw, task))
            if not running_task.done():
                running[delivery] = running_task
        if timeout and running:
            self._deadlines.append((deadline, self._delivery_seq))
        if timeout and self._deadlines and self._timeout_timer is None:
            self._timeout_timer = self.loop.call_at(
                self._loop_time(self._deadlines[0][0]), self._expire_timeouts)
        self.scoreboard.set(self.index, "in_flight", self.in_flight)

    def _dead_letter_invalid(self, delivery: int, raw: bytes, reason: str, detail: str) -> None:
        log.warning("invalid task dead-lettered (%s): %s", reason, _short(raw))
        counts = self._counts(INVALID_TYPE)
        counts[TAKEN] += 1
        counts[DEAD] += 1
        self._pending.dead(raw, protocol.dead_entry(raw, reason, detail, 0, self.host, self.name))
        self._settled(delivery, finished=True, failed=True)

    def _loop_time(self, monotonic: float) -> float:
        return self.loop.time() + (monotonic - time.monotonic())

    def _expire_timeouts(self) -> None:
        # One timer for all tasks: deadlines come in start order, since every task has the
        # same task_timeout, and so do deliveries in self._running (a dict keeps insertion
        # order). Much cheaper than a timeout scope per task.
        self._timeout_timer = None
        deadlines = self._deadlines
        now = time.monotonic()
        last = 0
        while deadlines and deadlines[0][0] <= now:
            last = deadlines.popleft()[1]
        if last:
            timed_out = self._timed_out
            for delivery, running_task in list(self._running.items()):
                if delivery > last:
                    break
                if delivery not in timed_out and not running_task.done():
                    timed_out.add(delivery)
                    running_task.cancel()
        if deadlines:
            self._timeout_timer = self.loop.call_at(self._loop_time(deadlines[0][0]),
                                                    self._expire_timeouts)

    async def _call_sync_handler(self, task: dict) -> None:
        result = await self.loop.run_in_executor(self._executor, self.handler, task)
        if inspect.isawaitable(result):
            await result

    def _counts(self, task_type: str) -> list[int]:
        counts = self._type_counts.get(task_type)
        if counts is None:
            if len(self._type_counts) >= MAX_TYPES:  # producers inventing types: bounded
                task_type = OTHER_TYPES
                counts = self._type_counts.get(task_type)
            if counts is None:
                counts = self._type_counts[task_type] = [0] * len(TYPE_COUNTERS)
        return counts

    def _timed(self, started: float) -> None:
        duration = time.monotonic() - started
        self._duration_sum += duration
        self._histogram[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1

    def publish_metrics(self) -> None:
        """Copy this worker's counters to shared memory for the supervisor's metrics."""
        self.scoreboard.publish_metrics(self.index, self._type_counts, self._histogram,
                                        self._duration_sum)

    async def _run(self, delivery: int, raw: bytes, task: dict) -> None:
        counts = self._counts(task["type"])  # now: the handler may change the dict
        counts[TAKEN] += 1
        started = time.monotonic()
        error: BaseException
        # Everything that can raise is inside the try: whatever happens, the delivery settles
        # (or is left for the requeue), so its slot, in_flight and processing entry never leak.
        try:
            if self._log_tasks:
                log.info("processing task: %s", _short(task))
            if self.handler_is_async:
                await self.handler(task)
            else:
                await self._call_sync_handler(task)
        except asyncio.CancelledError as exc:
            if delivery in self._drain_cancelled:
                # Cancelled at drain_timeout: the task stays in the processing list and is
                # given back by the final requeue - unless a sync handler's thread still runs
                # it: like an abandoned one, it is requeued once this process is gone.
                counts[TAKEN] -= 1
                self._finish_running(delivery)
                raw_held = self.held.pop(delivery, None)
                if not self.handler_is_async and raw_held is not None:
                    self._abandoned.append(raw_held)
                self.scoreboard.release(self.index, 1)
                raise
            if delivery in self._timed_out:
                self._timed_out.discard(delivery)
                if not self.handler_is_async:
                    self._abandon(delivery, counts)
                    return
                error = TimeoutError(f"timed out after {self.config.task_timeout:g}s")
            else:
                error = exc  # the handler's own cancellation: a failure like any other
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # noqa: BLE001
            error = exc  # whatever a handler raises is recorded; the worker carries on
        else:
            self._timed(started)
            counts[SUCCEEDED] += 1
            self._finish_running(delivery)
            self._pending.acks.append(raw)
            self._settled(delivery, finished=True, failed=False)
            self.succeeded += 1
            if self._log_tasks:
                log.info("task done: %s", _short(task))
                log.info("processed task #%d", self.succeeded)
            return
        self._timed(started)
        counts[FAILED] += 1
        self._finish_running(delivery)
        try:
            self._fail(delivery, raw, counts, error)
        except Exception as exc:  # noqa: BLE001 - e.g. a retry that cannot be encoded
            log.exception("could not schedule a retry; dead-lettering the task")
            entry = protocol.dead_entry(raw, "unretriable", f"{type(exc).__name__}: {exc}",
                                        0, self.host, self.name)
            self._pending.dead(raw, entry)
            counts[DEAD] += 1
            self._settled(delivery, finished=True, failed=True)

    def _abandon(self, delivery: int, counts: list[int]) -> None:
        """A sync handler ran past task_timeout: its thread cannot be stopped, so the task
        must not run again while it may still be running here. Leave it in the processing
        list and stop this worker; once the process is gone it is requeued (as a crash)."""
        log.error("sync handler still running after task_timeout %gs: stopping this worker so "
                  "that its thread dies; the task is requeued when it has",
                  self.config.task_timeout)
        counts[FAILED] += 1
        self._abandoned.append(self.held.pop(delivery))
        self._finish_running(delivery)
        self.exit_code = EXIT_ABANDONED
        self.stop("a sync handler is stuck")

    def _finish_running(self, delivery: int) -> None:
        if delivery == self._isolated:
            self._isolated = None
        self._running.pop(delivery, None)
        self.in_flight -= 1
        if self.in_flight == 0:
            self.scoreboard.set(self.index, "state", DRAINING if self.stopping else IDLE)
        self._slot_freed.set()

    def _fail(self, delivery: int, raw: bytes, counts: list[int], error: BaseException) -> None:
        # From the raw bytes, not the handler's dict, which the handler may have changed.
        task = protocol.decode_task(raw, self.config.max_payload_bytes)
        attempts = task.get("attempts")
        attempts = (attempts if isinstance(attempts, int) else 0) + 1
        description = f"{type(error).__name__}: {error}"
        if isinstance(error, TaskRejected):
            reason = "rejected"
        elif attempts > self.config.max_retries:
            reason = "max_retries"
        else:
            reason = ""
        if reason:
            log.error("task failed, dead-lettered (%s, attempt %d): %s: %s",
                      reason, attempts, description, _short(task))
            entry = protocol.dead_entry(raw, reason, description, attempts, self.host, self.name)
            self._pending.dead(raw, entry)
            counts[DEAD] += 1
            self._settled(delivery, finished=True, failed=True)
            return
        delay = protocol.retry_delay(attempts, self.config.retry_backoff)
        if isinstance(error, RetryLater) and error.delay is not None:
            try:
                requested = float(error.delay)
            except (TypeError, ValueError):
                requested = -1.0
            if math.isfinite(requested) and requested >= 0:
                delay = requested
        task["attempts"] = attempts
        due = time.time() + delay
        log.error("task failed (attempt %d of %d), retry in %.1fs: %s: %s",
                  attempts, self.config.max_retries + 1, delay, description, _short(task))
        self._pending.retry(raw, protocol.encode_task(task), due)
        counts[RETRIED] += 1
        self._settled(delivery, finished=False, failed=True)
        self._schedule_retry_move(delay)

    def _settled(self, delivery: int, *, finished: bool, failed: bool) -> None:
        counts = self._pending_counts
        if finished:
            counts[0] += 1
        else:
            counts[1] += 1
        if failed:
            counts[2] += 1
        self.held.pop(delivery, None)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._start_flush)

    # --- writing results

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        if self._flushing is None or self._flushing.done():
            self._flushing = self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        """Write every pending result in one script call; on failure send the same call again
        (it carries a token, so a call that did run before its reply was lost is not
        applied twice)."""
        backoff = RECONNECT_MIN
        while len(self._pending):
            settlement, self._pending = self._pending, Settlement()
            finished, returned, failed = self._pending_counts
            self._pending_counts = [0, 0, 0]
            self._writing = settlement
            # Should this process die before the reply, the supervisor asks Redis whether
            # this settlement was applied, and counts its finished tasks toward max_tasks.
            self.scoreboard.set(self.index, "settle_token", settlement.token_number)
            self.scoreboard.set(self.index, "settling", finished)
            while True:
                try:
                    await self.queue.settle(self.processing_key, settlement)
                    break
                except ResponseError as exc:
                    if protocol.is_temporary_error(exc):
                        # OOM, READONLY, CLUSTERDOWN, TRYAGAIN, BUSY...: keep the results and
                        # send the same call again (its token makes that safe). Dropping them
                        # would rerun finished tasks.
                        self._connection_lost(exc, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, RECONNECT_MAX)
                        continue
                    # Refused for good: a malformed call (SETTLE's REFUSED, before any write)
                    # or a permanent error (NOPERM, WRONGTYPE: a misconfigured server, maybe
                    # after some writes). Sending it again cannot help. The next reconcile
                    # gives back what is still in the processing list (it runs again), and
                    # the slots go back to the budget.
                    log.error("redis refused %d result(s) (%s); they go back to the queue",
                              len(settlement), exc)
                    self._needs_reconcile = True
                    finished, returned = 0, finished + returned
                    break
                except RedisError as exc:
                    self._connection_lost(exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX)
            self._writing = None
            self._record_settled(finished, returned, failed)

    def _record_settled(self, finished: int, returned: int, failed: int) -> None:
        scoreboard = self.scoreboard
        scoreboard.set(self.index, "in_flight", self.in_flight)
        scoreboard.finish(self.index, finished)
        scoreboard.release(self.index, returned)
        self.processed += finished
        self.failed += failed
        scoreboard.add(self.index, "processed", finished)
        scoreboard.add(self.index, "failed", failed)
        if scoreboard.budget_spent() and not self.stopping:
            self.stop("max_tasks reached")
        elif self.recycle_after and self.processed >= self.recycle_after and not self.stopping:
            self.stop(f"recycling after {self.processed} tasks")

    def _schedule_retry_move(self, delay: float) -> None:
        if self._retry_timer is not None and self._retry_timer.when() <= self.loop.time() + delay:
            return
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._retry_timer = self.loop.call_later(delay + 0.005, self._move_retries_soon)

    def _move_retries_soon(self) -> None:
        self._retry_timer = None
        self.loop.create_task(self._move_due_retries())

    async def _move_due_retries(self) -> None:
        try:
            await self.queue.move_due_retries()
        except RedisError:
            pass  # the next housekeeping round (or the supervisor) moves them

    # --- housekeeping: heartbeat, parent watch, recycling, due retries, process title

    async def _housekeeping(self) -> None:
        scoreboard = self.scoreboard
        period = min(HOUSEKEEPING_PERIOD, self.config.worker_timeout / 4)
        memory_limit = self.config.max_memory_per_worker * 1024 * 1024
        sweep_retries = self.parent_pid is None
        while True:
            scoreboard.beat(self.index)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("supervisor (pid %d) is gone", self.parent_pid)
                self.stop("supervisor died")
            # Only after some work: a worker that starts above the limit would be replaced
            # by another that does too, forever, and no task would ever run.
            if memory_limit and self.processed and not self.stopping and (
                    _rss_bytes() > memory_limit):
                self.stop(f"recycling: memory above {self.config.max_memory_per_worker} MiB")
            if sweep_retries and not self.stopping:
                await self._move_due_retries()
            self.publish_metrics()
            self._set_title()
            await asyncio.sleep(period)

    def _set_title(self) -> None:
        state = "draining" if self.stopping else ("busy" if self.in_flight else "idle")
        setproctitle(
            f"workerpool: worker {self.name} [{self.config.redis_key}] {state} "
            f"{self.in_flight}/{self.config.concurrency} done={self.processed}"
        )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (the `fast` extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(
    config: Config,
    handler: Callable[[dict], Any],
    scoreboard: Scoreboard,
    index: int,
    *,
    name: str | None = None,
    list_id: str | None = None,
    parent_pid: int | None = None,
) -> int:
    """Run one worker in this process until it stops; returns its exit code.

    Under a supervisor (parent_pid set), SIGINT is ignored - the supervisor decides - and
    SIGTERM drains. Alone, both drain.
    """
    if parent_pid is not None:
        # Forked: move everything inherited from the supervisor (the imported handler and
        # libraries) to the collector's permanent generation. Full collections would otherwise
        # write to every object's header and copy-on-write every page still shared with the
        # supervisor and the other workers (about 4 MiB of PSS per worker).
        gc.freeze()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(config, handler, scoreboard, index, name=name, list_id=list_id,
                    parent_pid=parent_pid)
    supervised = parent_pid is not None
    if supervised:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGINT, worker.stop, "SIGINT")
    loop.add_signal_handler(signal.SIGTERM, worker.stop, "SIGTERM")
    for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGQUIT):
        # Supervisor-only signals; a worker inherits the supervisor's handlers otherwise.
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGQUIT else signal.SIG_IGN)
    setup = getattr(sys.modules.get(getattr(handler, "__module__", ""), None),
                    "workerpool_setup", None)
    try:
        if callable(setup):
            setup(config)
        return loop.run_until_complete(worker.run())
    finally:
        loop.close()


def _ping(config: Config) -> None:
    from workerpool.connection import sync_client

    client = sync_client(config)
    try:
        client.ping()
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m workerpool.worker`: one worker process without a supervisor."""
    parser = argparse.ArgumentParser(prog="python -m workerpool.worker",
                                     description="Run one workerpool worker without a supervisor.")
    parser.add_argument("--config", help="INI file (default: $WORKERPOOL_CONFIG, ./workerpool.ini)")
    parser.add_argument("--redis-url")
    parser.add_argument("--redis-key")
    parser.add_argument("--interval")
    parser.add_argument("--max-tasks")
    parser.add_argument("--concurrency")
    parser.add_argument("--worker-id", default="standalone",
                        help="names this worker's processing list; unique per host")
    args = parser.parse_args(argv)
    overrides = {
        "redis_url": args.redis_url,
        "redis_key": args.redis_key,
        "interval": args.interval,
        "max_tasks": args.max_tasks,
        "concurrency": args.concurrency,
    }
    try:
        config = load_config(args.config, overrides=overrides)
        handler = load_handler(config)
    except ConfigError as error:
        print(f"workerpool: config error: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_file)
    set_process_name(f"worker {args.worker_id}")
    log.info("starting worker; redis key: %s; interval: %gs; max tasks: %s",
             config.redis_key, config.interval, config.max_tasks or "unlimited")
    try:
        _ping(config)
    except RedisError as exc:
        log.error("cannot connect to redis at %s: %s", describe(config), exc)
        return 1
    # Tasks a previous run of this worker left behind go back to the queue first.
    from workerpool.connection import sync_client

    client = sync_client(config)
    try:
        queue = protocol.SyncQueue(client, config.redis_key)
        key = queue.keys.processing(config.host_name, args.worker_id)
        requeued, dead = queue.requeue(key, config.max_deliveries)
        if requeued or dead:
            log.warning("requeued %d task(s) left by a previous run (%d dead-lettered)",
                        requeued, dead)
    finally:
        client.close()
    scoreboard = Scoreboard(1, config.max_tasks)
    return run_worker(config, handler, scoreboard, 0, name=args.worker_id)


if __name__ == "__main__":
    exit_code = main()
    # A sync handler stuck in its thread would keep the interpreter from exiting.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
