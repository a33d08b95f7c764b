"""The supervisor: forks the workers and keeps the pool healthy.

A plain synchronous loop. Signal handlers only record the signal (the wake-up fd interrupts
the loop's select); the loop acts. Each tick it reaps dead workers (requeueing their
processing lists before anything replaces them), starts workers that are due (with
exponential backoff after crashes), kills workers whose event loop stopped beating, and,
about once a second, moves due retries, heartbeats this host in Redis, requeues the lists of
silent hosts and of dead local processes, and writes the status file.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from setproctitle import setproctitle

from workerpool import sdnotify
from workerpool.config import Config, ConfigError, load_handler, mask_url
from workerpool.connection import describe, sync_client
from workerpool.daemon import write_json_atomic
from workerpool.logs import set_process_name
from workerpool.metrics import MetricsServer, MetricsSnapshot
from workerpool.protocol import SyncQueue
from workerpool.scoreboard import DRAINING, STARTING, Scoreboard
from workerpool.worker import run_worker

log = logging.getLogger("workerpool.supervisor")

TICK = 1.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that lived this long resets its slot's backoff
KILL_GRACE = 5.0  # after drain_timeout, how long workers get to give back before SIGKILL
ORPHAN_SWEEP_PERIOD = 5.0
# The supervisor's own Redis calls are tiny (a requeue script, a heartbeat): a server that does
# not answer one within this is unavailable. Short, because the loop also serves signals, hung
# workers and the systemd watchdog, and makes at most one failing call per tick.
SUPERVISOR_REDIS_TIMEOUT = 2.0
THROUGHPUT_WINDOW = 60  # seconds over which `status` and `stats` report tasks per second
# At stop, how long to keep trying requeues (and settlement checks) Redis refused meanwhile.
SHUTDOWN_REDIS_GRACE = 5.0
_UNKNOWN = object()  # Redis could not be asked

_SIGNAL_NAMES = {getattr(signal, name): name for name in dir(signal)
                 if name.startswith("SIG") and not name.startswith("SIG_")}


@dataclass
class WorkerProcess:
    """What the supervisor knows about one forked worker."""

    slot: int
    pid: int
    started: float
    retiring: bool = False  # asked to stop (reload, scale down, drain): not counted as active
    kill_at: float | None = None  # when to SIGKILL it if it has not exited
    killed: str = ""  # why we sent SIGKILL: "hung", "late" (drain overran) or "now"
    # We sent it SIGTERM (reload, scale down, drain): dying of it means it was stopped before
    # its own handler was installed (during after_fork, e.g. django.setup()), not a crash.
    asked_to_stop: bool = False

    @property
    def name(self) -> str:
        return str(self.slot + 1)

    @property
    def list_id(self) -> str:
        return f"{self.slot + 1}-{self.pid}"


class CrashLoop(Exception):
    """Too many worker deaths in crash_window."""


class Supervisor:
    """Runs the pool until it is stopped; `run()` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        handler: Callable[[dict], Any],
        *,
        reload_config: Callable[[], Config] | None = None,
        status_file: str | None = None,
        before_fork: Callable[[], None] | None = None,
        after_fork: Callable[[], None] | None = None,
    ) -> None:
        """`before_fork` runs in the supervisor before each fork (close database connections
        there), `after_fork` in each new worker before its loop starts (e.g. django.setup())."""
        self.config = config
        self.before_fork = before_fork
        self.after_fork = after_fork
        self.handler = handler
        self.reload_config = reload_config
        self.status_file = status_file
        self.target = config.workers
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.scoreboard = Scoreboard(max(64, config.workers * 4), config.max_tasks)
        self.slot_backoff: dict[int, float] = {}
        self.slot_due: dict[int, float] = {}  # slot -> monotonic time its restart is allowed
        self.crashes: list[float] = []
        self.processed_by_exited = 0  # tasks finished by workers whose slot was cleared
        self.exited_metrics = MetricsSnapshot()  # counters of workers whose slot was cleared
        self.requeue_later: dict[str, bool] = {}  # processing key -> count_delivery
        # processing key of a dead worker -> (token, count) of the results it was writing
        self.unresolved_settlements: dict[str, tuple[int, int]] = {}
        self.metrics_server: MetricsServer | None = None
        self.throughput_samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=THROUGHPUT_WINDOW + 5)
        self.stopping = False
        self.stop_reason = ""
        self.exit_code = 0
        self.drain_deadline: float | None = None
        self.signals: list[int] = []
        self.pending_reload: list[int] = []  # pids still to be replaced after a reload
        self.ready_sent = False
        self.started_at = time.time()
        self.host = config.host_name
        self.pid = os.getpid()
        self._wake_read = self._wake_write = -1
        self._next_maintenance = 0.0
        self._next_orphan_sweep = 0.0
        self._redis_error_logged = False
        self._redis_failed_this_tick = False  # after one failed call, make no more this tick
        self._slots_capped_logged = False
        self._status_error_logged = False
        self._watchdog = sdnotify.watchdog_interval()
        self._client = supervisor_client(config)
        self.queue = SyncQueue(self._client, config.redis_key)

    # --- signals

    def _install_signals(self) -> None:
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                       signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: Any) -> None:
        # Only record: logging or os.kill here could deadlock (DESIGN.md pitfalls).
        self.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # reaping happens every tick
            name = _SIGNAL_NAMES.get(signum, str(signum))
            if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.begin_drain(f"{name} received")
            elif signum == signal.SIGQUIT or (signum == signal.SIGINT and self.stopping):
                self.stop_now(f"{name} received")
            elif signum == signal.SIGHUP and not self.stopping:
                self.reload()
            elif signum == signal.SIGTTIN and not self.stopping:
                self.target += 1
                log.info("SIGTTIN: now %d worker(s)", self.target)
            elif signum == signal.SIGTTOU and not self.stopping:
                if self.target > 1:
                    self.target -= 1
                    log.info("SIGTTOU: now %d worker(s)", self.target)
                else:
                    log.info("SIGTTOU ignored: keeping the last worker")

    def _sleep(self, timeout: float) -> None:
        watched: list[Any] = [self._wake_read]
        if self.metrics_server is not None:
            watched.append(self.metrics_server)
        try:
            readable, _, _ = select.select(watched, [], [], max(0.0, timeout))
        except InterruptedError:
            readable = []
        if self.metrics_server is not None and self.metrics_server in readable:
            self.metrics_server.handle()
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass

    # --- main loop

    def run(self) -> int:
        """Start the workers and supervise them until the pool stops."""
        self._install_signals()
        set_process_name("supervisor")
        log.info("starting workerpool supervisor (pid %d) with %d worker(s) x %d concurrency",
                 self.pid, self.target, self.config.concurrency)
        log.info("redis: %s; redis key: %s; interval: %gs; max tasks: %s",
                 describe(self.config), self.config.redis_key, self.config.interval,
                 self.config.max_tasks or "unlimited")
        if self.config.metrics_port:
            try:
                self.metrics_server = MetricsServer(self.config.metrics_bind,
                                                    self.config.metrics_port,
                                                    self.metrics_snapshot)
            except ImportError:
                log.error("[metrics] port needs prometheus_client: "
                          "pip install 'workerpool[metrics]'")
                return 2
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d: %s", self.config.metrics_bind,
                          self.config.metrics_port, exc.strerror)
                return 1
            log.info("metrics on http://%s:%d/metrics", *self.metrics_server.address)
        self._sweep_orphans()
        try:
            while True:
                self._redis_failed_this_tick = False
                self._handle_signals()
                self._reap()
                if self.stopping and not self.workers:
                    break
                if not self.stopping:
                    self._manage()
                self._murder()
                now = time.monotonic()
                if now >= self._next_maintenance:
                    self._maintenance()
                    self._next_maintenance = now + TICK
                if not self.signals:
                    self._sleep(self._next_wake())
        except CrashLoop as exc:
            log.error("%s: stopping the pool", exc)
            self.exit_code = 1
            self.stop_now(str(exc))
            self._wait_all(KILL_GRACE)
        finally:
            self._shutdown()
        return self.exit_code

    def _next_wake(self) -> float:
        now = time.monotonic()
        wake = self._next_maintenance
        for due in self.slot_due.values():
            if due > now:  # a past one is spent or unneeded: waking for it would spin
                wake = min(wake, due)
        for worker in self.workers.values():
            if worker.kill_at is not None and not worker.killed:
                wake = min(wake, worker.kill_at)
        return min(TICK, max(0.005, wake - now))

    def _shutdown(self) -> None:
        sdnotify.notify("STOPPING=1")
        deadline = time.monotonic() + SHUTDOWN_REDIS_GRACE
        while self.requeue_later or self.unresolved_settlements:
            self._redis_failed_this_tick = False
            self._retry_deferred()
            if time.monotonic() >= deadline or not self._redis_failed_this_tick:
                break
            time.sleep(0.5)
        if self.requeue_later:
            # Keep this host in {T}:hosts: once its heartbeat is older than host_timeout,
            # another host requeues these lists (or this one, at its next start).
            log.error("redis unavailable: %d processing list(s) not requeued; another host "
                      "takes them after host_timeout, or this one at its next start",
                      len(self.requeue_later))
        else:
            try:
                self.queue.forget_host(self.host)
            except RedisError:
                pass
        if self.status_file:
            try:
                os.unlink(self.status_file)
            except OSError:
                pass
        taken, finished, max_tasks = self.scoreboard.totals()
        total = self._processed_total()
        log.info("workerpool stopped (%s); %s task(s) finished%s", self.stop_reason or "done",
                 finished if max_tasks else total,
                 f" of max_tasks {max_tasks}" if max_tasks else "")
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._client.close()

    # --- workers

    def _active(self) -> list[WorkerProcess]:
        return [worker for worker in self.workers.values() if not worker.retiring]

    def _manage(self) -> None:
        if self.scoreboard.budget_spent():
            self.begin_drain("max_tasks reached")
            return
        # A worker that started draining by itself (recycling) is replaced at once.
        for worker in self._active():
            if self.scoreboard.get(worker.slot, "state") == DRAINING:
                worker.retiring = True
                worker.kill_at = time.monotonic() + self.config.drain_timeout + KILL_GRACE
        # Scale down before a reload spawns replacements: a worker spawned and retired in the
        # same tick would die of SIGTERM before its handler is installed.
        self._scale_down()
        self._continue_reload()
        missing = self.target - len(self._active())
        now = time.monotonic()
        # A crashed worker's replacement waits for its slot's backoff: it is on its way, and
        # must not be started at once in another free slot (that would skip the backoff).
        used = {worker.slot for worker in self.workers.values()}
        missing -= sum(1 for slot, due in self.slot_due.items() if due > now and slot not in used)
        while missing > 0:
            slot = self._free_slot(now)
            if slot is None:
                self._warn_slots_capped()
                break
            self._spawn(slot)
            missing -= 1
        if missing <= 0:
            self._slots_capped_logged = False
        if not self.ready_sent and self._all_running():
            self.ready_sent = True
            sdnotify.notify("READY=1\nSTATUS=" + self._status_line())
            log.info("%d worker(s) running", len(self._active()))

    def _scale_down(self) -> None:
        active = self._active()
        surplus = len(active) - self.target
        if surplus <= 0:
            return
        # Workers still waiting for their reload replacement go first (they are going anyway),
        # then the highest slots.
        order = sorted(active, key=lambda w: (w.pid in self.pending_reload, w.slot), reverse=True)
        for worker in order[:surplus]:
            self._retire(worker, "scaling down")

    def _warn_slots_capped(self) -> None:
        if self._slots_capped_logged:
            return
        self._slots_capped_logged = True
        log.warning("cannot start more than %d worker(s) (the scoreboard's slots, sized at "
                    "start from workers): %d wanted; restart the pool to run more",
                    self.scoreboard.slots, self.target)

    def _all_running(self) -> bool:
        active = self._active()
        return len(active) >= self.target and all(
            self.scoreboard.get(w.slot, "state") != STARTING for w in active
        )

    def _free_slot(self, now: float) -> int | None:
        used = {worker.slot for worker in self.workers.values()}
        for slot in range(self.scoreboard.slots):
            if slot not in used and self.slot_due.get(slot, 0.0) <= now:
                return slot
        return None

    def _spawn(self, slot: int) -> None:
        self.slot_due.pop(slot, None)
        config = self.config
        parent = self.pid
        if self.before_fork is not None:
            self.before_fork()
        # Set the slot up before the fork: the child writes its state (idle) and reserves its
        # max_tasks budget as soon as it runs, and the parent must not overwrite that after.
        self.scoreboard.claim_slot(slot, 0, 0)
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN, ENOMEM: systemd's TasksMax, memory pressure
            self.scoreboard.clear_slot(slot)
            backoff = self.slot_backoff.get(slot, BACKOFF_MIN)
            self.slot_due[slot] = time.monotonic() + backoff
            self.slot_backoff[slot] = min(backoff * 2, BACKOFF_MAX)
            log.error("cannot start worker %d: fork failed (%s); retrying in %.1fs",
                      slot + 1, exc.strerror, backoff)
            return
        if pid == 0:  # the child: never returns
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                os.close(self._wake_read)
                os.close(self._wake_write)
                if self.metrics_server is not None:
                    # Else a worker outliving the supervisor keeps the port from its successor.
                    self.metrics_server.close()
                for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_DFL)
                name = str(slot + 1)
                set_process_name(f"worker {name}")
                random.seed()
                if self.after_fork is not None:
                    self.after_fork()
                code = run_worker(config, self.handler, self.scoreboard, slot, name=name,
                                  list_id=f"{name}-{os.getpid()}", parent_pid=parent)
            except BaseException:  # noqa: BLE001 - a worker must never return into the loop
                log.exception("worker %d crashed", slot + 1)
            finally:
                logging.shutdown()
                os._exit(code)
        self.scoreboard.set(slot, "pid", pid)
        self.workers[pid] = WorkerProcess(slot, pid, time.monotonic())
        log.info("worker %d started (pid %d)", slot + 1, pid)

    def _retire(self, worker: WorkerProcess, why: str) -> None:
        if worker.retiring and worker.kill_at is not None:
            return
        worker.retiring = True
        worker.kill_at = time.monotonic() + self.config.drain_timeout + KILL_GRACE
        log.info("stopping worker %s (pid %d): %s", worker.name, worker.pid, why)
        worker.asked_to_stop = True
        self._kill(worker.pid, signal.SIGTERM)

    def _kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, status)

    def _worker_exited(self, worker: WorkerProcess, status: int) -> None:
        now = time.monotonic()
        lifetime = now - worker.started
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        # A hung worker counts as a crash; one we killed for stopping does not, nor one we
        # sent SIGTERM that died of it before it had installed its own handler.
        killed_by_us = worker.killed in ("late", "now")
        stopped_while_starting = (worker.asked_to_stop and not worker.killed
                                  and os.WIFSIGNALED(status)
                                  and os.WTERMSIG(status) == signal.SIGTERM)
        if os.WIFSIGNALED(status):
            how = f"was killed by {_SIGNAL_NAMES.get(os.WTERMSIG(status), os.WTERMSIG(status))}"
        else:
            how = f"exited with code {os.WEXITSTATUS(status)}"
        # The dead worker's tasks go back before anything replaces it. A death that was not
        # our doing counts as a delivery of each task it held (poison-pill detection).
        count = not clean and not killed_by_us and not stopped_while_starting
        self._requeue_list(worker, count_delivery=count)
        kept = self._count_last_settlement(worker)
        self.scoreboard.reclaim(worker.slot, keep=kept)
        self.processed_by_exited += self.scoreboard.get(worker.slot, "processed")
        self.exited_metrics.add(*self.scoreboard.read_metrics(worker.slot))
        self.scoreboard.clear_slot(worker.slot)
        if worker.pid in self.pending_reload:
            self.pending_reload.remove(worker.pid)
        if clean:
            log.info("worker %s (pid %d) %s", worker.name, worker.pid, how)
            return
        if stopped_while_starting:
            log.info("worker %s (pid %d) %s: stopped while starting up", worker.name,
                     worker.pid, how)
            return
        log.error("worker %s (pid %d) %s after %.1fs", worker.name, worker.pid, how, lifetime)
        if self.stopping or killed_by_us:
            return
        backoff = self.slot_backoff.get(worker.slot, BACKOFF_MIN)
        if lifetime >= STABLE_AFTER:
            backoff = BACKOFF_MIN
        now = time.monotonic()  # the backoff runs from now: the requeue above took time
        self.slot_due[worker.slot] = now + backoff
        self.slot_backoff[worker.slot] = min(backoff * 2, BACKOFF_MAX)
        self.crashes = [t for t in self.crashes if now - t < self.config.crash_window]
        self.crashes.append(now)
        if len(self.crashes) >= self.config.crash_limit:
            raise CrashLoop(f"crash loop: {len(self.crashes)} worker deaths within "
                            f"crash_window {self.config.crash_window:g}s "
                            f"(crash_limit {self.config.crash_limit})")
        log.info("restarting worker %s in %.1fs", worker.name, backoff)

    def _count_last_settlement(self, worker: WorkerProcess) -> int:
        """A worker that died while writing results may have had them applied: if so they
        count as finished, else reclaim() would hand their slots out again (max_tasks
        exceeded by up to one batch). Returns how many slots must wait until Redis tells."""
        settling = int(self.scoreboard.get(worker.slot, "settling"))
        if not settling or not self.scoreboard.max_tasks:
            return 0
        key = self.queue.keys.processing(self.host, worker.list_id)
        applied = self._last_settlement(key)
        if applied is _UNKNOWN:
            token = int(self.scoreboard.get(worker.slot, "settle_token"))
            self.unresolved_settlements[key] = (token, settling)
            log.warning("worker %s died while writing %d result(s); they are counted toward "
                        "max_tasks once redis tells whether they were written", worker.name,
                        settling)
            return settling
        counted = self.scoreboard.finish_settlement(worker.slot, applied)
        if counted:
            log.info("worker %s died after its last %d result(s) were written: counted",
                     worker.name, counted)
        return 0

    def _last_settlement(self, key: str) -> Any:
        """The last settlement token applied to a processing list, None, or _UNKNOWN."""
        if self._redis_failed_this_tick:
            return _UNKNOWN
        try:
            return self.queue.last_settlement(key)
        except RedisError:
            self._redis_failed_this_tick = True
            return _UNKNOWN

    def _resolve_settlements(self) -> None:
        """Count (or give back) the slots of dead workers' settlements Redis could not judge."""
        for key, (token, count) in list(self.unresolved_settlements.items()):
            applied = self._last_settlement(key)
            if applied is _UNKNOWN:
                return
            del self.unresolved_settlements[key]
            written = applied == token
            self.scoreboard.resolve_kept(count, finished=written)
            if written:
                self.processed_by_exited += count
            log.info("%d result(s) of a dead worker (%s) were %s", count, key,
                     "written: counted" if written else "not written: their tasks run again")

    def _requeue_list(self, worker: WorkerProcess, *, count_delivery: bool) -> None:
        key = self.queue.keys.processing(self.host, worker.list_id)
        self._requeue_key(key, count_delivery, f"worker {worker.name}")

    def _requeue_key(self, key: str, count_delivery: bool, owner: str) -> None:
        # One try, and none at all once a Redis call failed in this tick: the loop must not
        # stall (signals, hung workers, the watchdog) while Redis is away. A requeue not done
        # is kept and tried again in the next ticks.
        if self._redis_failed_this_tick:
            if key not in self.requeue_later:
                log.warning("redis unavailable: requeueing %s's tasks later", owner)
            self.requeue_later[key] = count_delivery
            return
        try:
            requeued, dead = self.queue.requeue(key, self.config.max_deliveries, count_delivery)
        except RedisError as exc:
            self._redis_failed_this_tick = True
            if key not in self.requeue_later:
                log.error("redis unavailable while requeueing %s's tasks (%s); will retry",
                          owner, exc)
            self.requeue_later[key] = count_delivery
            return
        self.requeue_later.pop(key, None)
        if requeued:
            log.warning("requeued %d task(s) of %s", requeued, owner)
        if dead:
            log.error("dead-lettered %d task(s) that killed their worker %d times",
                      dead, self.config.max_deliveries)

    def _murder(self) -> None:
        now = time.monotonic()
        timeout = self.config.worker_timeout
        for worker in list(self.workers.values()):
            if worker.killed:
                continue  # SIGKILL sent; reaping follows
            if worker.kill_at is not None and now >= worker.kill_at:
                log.warning("worker %s (pid %d) did not stop in time: killing it",
                            worker.name, worker.pid)
                worker.killed = "late"
                self._kill(worker.pid, signal.SIGKILL)
                continue
            silent = now - self.scoreboard.get(worker.slot, "heartbeat")
            if silent > timeout:
                log.error("worker %s (pid %d) silent for %.1fs (worker_timeout %gs): killing it",
                          worker.name, worker.pid, silent, timeout)
                worker.killed = "hung"
                self._kill(worker.pid, signal.SIGKILL)

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)

    # --- stopping and reloading

    def begin_drain(self, reason: str) -> None:
        """Stop taking tasks; workers finish in-flight ones within drain_timeout."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        in_flight = sum(self.scoreboard.get(w.slot, "in_flight") for w in self.workers.values())
        log.info("%s: draining %d worker(s), %d task(s) in flight (drain_timeout %gs)",
                 reason, len(self.workers), in_flight, self.config.drain_timeout)
        sdnotify.notify("STOPPING=1")
        for worker in self.workers.values():
            worker.retiring = True
            worker.kill_at = time.monotonic() + self.config.drain_timeout + KILL_GRACE
            worker.asked_to_stop = True
            self._kill(worker.pid, signal.SIGTERM)

    def stop_now(self, reason: str) -> None:
        """Kill every worker now; their tasks go back to the queue."""
        self.stopping = True
        self.stop_reason = self.stop_reason or reason
        log.warning("%s: stopping now, in-flight tasks go back to the queue", reason)
        for worker in self.workers.values():
            worker.retiring = True
            worker.killed = "now"
            self._kill(worker.pid, signal.SIGKILL)

    def reload(self) -> None:
        """Re-read the config and replace the workers one at a time."""
        if self.reload_config is None:
            log.warning("SIGHUP: nothing to reload from")
            return
        try:
            config = self.reload_config()
            handler = load_handler(config) if config.handler != self.config.handler else None
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, keeping the old one: %s", exc)
            return
        fixed = ("redis_url", "redis_key", "redis_mode", "sentinels", "sentinel_master", "host_id")
        changed = [name for name in fixed if getattr(config, name) != getattr(self.config, name)]
        if (config.max_tasks == 0) != (self.config.max_tasks == 0):
            # The shared counters count taken tasks only under a limit: slots the running
            # workers reserved while unlimited would be given back into a limit never charged.
            changed.append("max_tasks (between unlimited and a limit)")
        if changed:
            # The processing lists, heartbeats and orphan sweeps of the running workers are
            # under the old queue and host: moving them live could strand their tasks.
            log.error("SIGHUP: config not reloaded: %s cannot change while running; restart "
                      "the pool instead", ", ".join(changed))
            return
        if handler is not None:
            self.handler = handler
        if config.max_tasks != self.config.max_tasks:
            self.scoreboard.set_max_tasks(config.max_tasks)
            log.info("SIGHUP: max_tasks now %d", config.max_tasks)
        self.config = config
        self.target = config.workers
        self.pending_reload = [worker.pid for worker in self._active()]
        log.info("SIGHUP: config reloaded; replacing %d worker(s) one at a time",
                 len(self.pending_reload))

    def _continue_reload(self) -> None:
        # One replacement at a time: the new worker must be running before the old one goes.
        while self.pending_reload:
            old = self.workers.get(self.pending_reload[0])
            if old is None or old.retiring:
                self.pending_reload.pop(0)
                continue
            break
        if not self.pending_reload:
            return
        starting = [w for w in self._active() if w.pid not in self.pending_reload
                    and self.scoreboard.get(w.slot, "state") == STARTING]
        if starting:
            return
        slot = self._free_slot(time.monotonic())
        if slot is None:
            return  # try again next tick; the old worker stays on the list
        old = self.workers[self.pending_reload.pop(0)]
        self._spawn(slot)
        self._retire(old, "replaced after reload")

    # --- once a second

    def _maintenance(self) -> None:
        now = time.time()
        self.throughput_samples.append((time.monotonic(), self._processed_total()))
        status = self.status()
        self._retry_deferred()
        if not self._redis_failed_this_tick:
            self._redis_maintenance(now, status)
        self._write_status(status)
        line = self._status_line()
        setproctitle(f"workerpool: supervisor [{self.config.redis_key}] {line}")
        sdnotify.notify("STATUS=" + line)
        if self._watchdog is not None:
            sdnotify.notify("WATCHDOG=1")

    def _retry_deferred(self) -> None:
        """Requeues and settlement checks that Redis refused earlier."""
        for key, count_delivery in list(self.requeue_later.items()):
            self._requeue_key(key, count_delivery, key)
        self._resolve_settlements()

    def _redis_maintenance(self, now: float, status: dict[str, Any]) -> None:
        try:
            self.queue.move_due_retries(now)
            self.queue.heartbeat(self.host, json.dumps(status).encode(),
                                 ttl=self.config.host_timeout * 2)
            if time.monotonic() >= self._next_orphan_sweep:
                self._next_orphan_sweep = time.monotonic() + ORPHAN_SWEEP_PERIOD
                self._sweep_orphans()
                if not self._redis_failed_this_tick:
                    self._requeue_silent_hosts()
            if self._redis_error_logged:
                log.warning("redis reachable again")
                self._redis_error_logged = False
        except RedisError as exc:
            self._redis_failed_this_tick = True
            if not self._redis_error_logged:
                log.error("redis unavailable at %s (%s); workers keep retrying",
                          describe(self.config), exc)
                self._redis_error_logged = True

    def _sweep_orphans(self) -> None:
        """Requeue this host's processing lists whose worker process is gone."""
        try:
            keys = self.queue.processing_lists(self.host)
        except RedisError as exc:
            self._redis_failed_this_tick = True
            log.error("redis unavailable at %s: %s", describe(self.config), exc)
            return
        live = {w.list_id for w in self.workers.values()}
        for key in keys:
            host, list_id = self.queue.keys.processing_owner(key)
            if host != self.host or not _is_worker_list(list_id):
                continue  # another host's (the pattern matched more), or a standalone worker's
            if list_id in live or key.decode() in self.requeue_later:
                continue
            if _worker_still_running(list_id, self.config.redis_key):
                continue  # a worker of a previous supervisor of ours, draining on its own
            self._requeue_key(key.decode(), True, f"dead process {list_id}")

    def _requeue_silent_hosts(self) -> None:
        for host in self.queue.silent_hosts(self.config.host_timeout):
            if host == self.host:
                continue
            moved = self.queue.requeue_host(host, self.config.max_deliveries)
            self.queue.forget_host(host)
            log.warning("host %s silent for over %gs: requeued %d of its task(s)",
                        host, self.config.host_timeout, moved)

    def _status_line(self) -> str:
        active = self._active()
        in_flight = sum(self.scoreboard.get(w.slot, "in_flight") for w in self.workers.values())
        done = self._processed_total()
        taken, finished, max_tasks = self.scoreboard.totals()
        line = f"{len(active)} workers, {in_flight} in flight, done={done}"
        if max_tasks:
            line += f", max_tasks {finished}/{max_tasks}"
        if self.stopping:
            line += ", draining"
        return line

    def status(self) -> dict[str, Any]:
        """The supervisor's view for `workerpool status`."""
        now = time.monotonic()
        workers = []
        for worker in sorted(self.workers.values(), key=lambda w: w.slot):
            view = self.scoreboard.slot(worker.slot)
            workers.append({
                "worker": worker.name,
                "pid": worker.pid,
                "state": "retiring" if worker.retiring and view.state_name not in (
                    "draining", "stopped") else view.state_name,
                "processed": view.processed,
                "failed": view.failed,
                "in_flight": view.in_flight,
                "busy_for": round(now - view.busy_since, 3) if view.in_flight else 0.0,
                "uptime": round(now - worker.started, 1),
                "heartbeat_age": round(now - view.heartbeat, 3),
            })
        taken, finished, max_tasks = self.scoreboard.totals()
        return {
            "pid": self.pid,
            "host": self.host,
            "started_at": self.started_at,
            "uptime": round(time.time() - self.started_at, 1),
            "redis_url": mask_url(self.config.redis_url),
            "redis_key": self.config.redis_key,
            "target_workers": self.target,
            "concurrency": self.config.concurrency,
            "state": "draining" if self.stopping else "running",
            "max_tasks": max_tasks,
            "taken": taken if max_tasks else None,
            "finished": finished if max_tasks else None,
            "processed": self._processed_total(),
            "throughput_1m": self.throughput(),
            "workers": workers,
            "updated_at": time.time(),
        }

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Counters over every worker since start, and the gauges, for a metrics scrape."""
        snapshot = self.exited_metrics.copy()
        for worker in self.workers.values():
            snapshot.add(*self.scoreboard.read_metrics(worker.slot))
        gauges = snapshot.gauges
        gauges["workers"] = len(self._active())
        gauges["in_flight"] = sum(self.scoreboard.get(w.slot, "in_flight")
                                  for w in self.workers.values())
        taken, finished, max_tasks = self.scoreboard.totals()
        if max_tasks:
            gauges["max_tasks_finished"] = finished
        if self._redis_failed_this_tick:
            return snapshot  # a scrape must not stall the loop on a Redis that just failed
        try:
            gauges.update(self.queue.counts(self.host))
        except RedisError as exc:
            self._redis_failed_this_tick = True
            log.warning("metrics: queue depths unavailable (%s)", exc)
        return snapshot

    def throughput(self) -> float | None:
        """Tasks finished per second over the last minute (None until two samples exist)."""
        samples = self.throughput_samples
        if len(samples) < 2:
            return None
        now, latest = samples[-1]
        when, earliest = next((w, t) for w, t in samples if now - w <= THROUGHPUT_WINDOW)
        return round((latest - earliest) / (now - when), 2) if now > when else None

    def _processed_total(self) -> int:
        """Tasks finished since start, by every worker, including those that have exited."""
        # Slots of exited workers are cleared (their counts are in processed_by_exited).
        live = sum(self.scoreboard.get(w.slot, "processed") for w in self.workers.values())
        return self.processed_by_exited + live

    def _write_status(self, status: dict[str, Any]) -> None:
        if not self.status_file:
            return
        try:
            write_json_atomic(self.status_file, status)
            self._status_error_logged = False
        except OSError as exc:
            # A full or read-only /run must not bring the pool down; status is informative.
            if not self._status_error_logged:
                log.warning("cannot write status file %s: %s", self.status_file, exc)
                self._status_error_logged = True


def supervisor_client(config: Config) -> Any:
    """A Redis client whose calls give up after SUPERVISOR_REDIS_TIMEOUT."""
    return sync_client(config, command_timeout=SUPERVISOR_REDIS_TIMEOUT)


def _worker_still_running(list_id: str, redis_key: str) -> bool:
    """Whether the pid in a list's name is still the workerpool worker the name says.

    After a reboot with the same host_id the pid may belong to an unrelated process (or to
    another worker), so being alive is not enough: the process title must name the same
    worker number and queue."""
    name, _, pid = list_id.partition("-")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            title = handle.read().decode(errors="replace")
    except OSError:
        return False
    return title.startswith(f"workerpool: worker {name} [{redis_key}] ")


def _is_worker_list(list_id: str) -> bool:
    """Whether a processing list is named like a supervised worker's: <slot>-<pid>."""
    slot, _, pid = list_id.partition("-")
    return slot.isdigit() and pid.isdigit()


def check_redis(config: Config) -> str | None:
    """None if Redis answers, else a one-line error naming the (masked) URL."""
    client = sync_client(config)
    try:
        client.ping()
    except RedisError as exc:
        return f"cannot connect to redis at {describe(config)}: {exc}"
    finally:
        client.close()
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `workerpool start --foreground` instead")
