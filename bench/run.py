"""The benchmark driver: every figure of issue 4, each beside a baseline measured in the same run.

    python -m bench [--quick] [--only NAME[,NAME]] [--concurrency C] [--repeat R] [--json PATH]

NAME is one of throughput, latency, idle, memory, scaling. Starts a private redis-server on a free
loopback port (tests/redis_server.py), starts every pool through the real CLI
(`python -m workerpool.cli --config INI start --foreground ...`) and stops everything it started,
by pid, before it exits. Every wait is bounded in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from redis_server import RedisServer, server_binary  # noqa: E402

try:
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover
    def _dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

KEY = "bench:q"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
FIGURES = ("throughput", "latency", "idle", "memory", "scaling")
RUN_TIMEOUT = 120.0  # the longest any one pool or baseline run may take

# Counts of the full run and of --quick.
FULL = {
    "throughput_tasks": 100_000,
    "throughput_concurrency": (100, 200, 500),
    "latency_tasks": 500,
    "idle_window": 10.0,
    "memory_steps": (10_000, 80_000, 10_000),
    "scaling_tasks": 50_000,
    "sleep_tasks": {1: 4_000, 10: 30_000, 100: 100_000},
}
QUICK = {
    "throughput_tasks": 30_000,
    "throughput_concurrency": (200,),
    "latency_tasks": 100,
    "idle_window": 5.0,
    "memory_steps": (5_000, 20_000, 5_000),
    "scaling_tasks": 20_000,
    "sleep_tasks": {1: 1_500, 10: 10_000, 100: 30_000},
}

# Targets of issue 4.
TARGET_RATE = 60_000.0
TARGET_RATIO = 0.70
TARGET_P50 = 1.0  # ms
TARGET_P99 = 2.0  # ms
TARGET_IDLE = 0.05  # CPU-s per 10 s
TARGET_PSS = 35.0  # MiB
TARGET_GROWTH = 1.0  # MiB


class BenchError(Exception):
    """A run that failed or broke a promise (counts do not add up)."""


# --- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_ns(pid: int) -> int:
    """Time on CPU in ns, from /proc/<pid>/schedstat (fine-grained cross-check)."""
    with open(f"/proc/{pid}/schedstat", "rb") as stat:
        return int(stat.read().split()[0])


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise BenchError(f"no Pss in /proc/{pid}/smaps_rollup")


def system_busy() -> float:
    """CPU-seconds the whole machine spent busy since boot (all CPUs, /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def waited_children_cpu() -> float:
    """utime + stime of every descendant this process has waited for (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    """One timed run: wall seconds, CPU of its processes and of Redis, and everyone else's."""

    tasks: int
    seconds: float
    cpu: float  # CPU-s of the pool's processes (supervisor + workers) or the baseline's
    redis_cpu: float
    others: float  # cores the rest of the machine kept busy meanwhile (noise)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.tasks * 1e6

    @property
    def redis_us(self) -> float:
        return self.redis_cpu / self.tasks * 1e6


class _Meter:
    def __init__(self, redis_pid: int) -> None:
        self.redis_pid = redis_pid
        self.start = (time.perf_counter(), waited_children_cpu(), cpu_seconds(redis_pid),
                      system_busy())

    def stop(self, tasks: int) -> Run:
        wall, mine, redis_cpu, busy = (time.perf_counter(), waited_children_cpu(),
                                       cpu_seconds(self.redis_pid), system_busy())
        seconds = wall - self.start[0]
        cpu = mine - self.start[1]
        redis_cpu -= self.start[2]
        others = max(0.0, (busy - self.start[3]) - cpu - redis_cpu) / seconds
        return Run(tasks, seconds, cpu, redis_cpu, others)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(text) for text in handle.read().split()]
    except OSError:
        return []


# --- machine


def machine() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        version = subprocess.run([server_binary(), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        info["redis"] = version.split(" v=")[1].split()[0] if " v=" in version else version
    except (OSError, subprocess.SubprocessError, IndexError):
        info["redis"] = "?"
    for name in ("redis", "hiredis", "orjson", "uvloop"):
        try:
            module = __import__(name)
            info[f"{name}-py" if name == "redis" else name] = getattr(module, "__version__", "yes")
        except ImportError:
            info[f"{name}-py" if name == "redis" else name] = "absent"
    return info


# --- runs


@dataclass
class Bench:
    server: RedisServer
    tmp: str
    quick: bool
    log: Callable[[str], None]
    client: redis.Redis = field(init=False)
    pools: list[Pool] = field(default_factory=list)  # every pool started, to clean up
    _seq: int = 0

    def __post_init__(self) -> None:
        self.client = self.server.client(socket_timeout=30)

    def kill_leftovers(self) -> None:
        """SIGKILL, by pid, any pool (supervisor and workers) still running (interrupted run)."""
        for pool in self.pools:
            if pool.process.poll() is None:
                pool.kill()

    @property
    def counts(self) -> dict[str, Any]:
        return QUICK if self.quick else FULL

    # Redis state

    def reset(self) -> None:
        self.client.flushall()

    def fill(self, count: int, chunk: int = 1000) -> None:
        """LPUSH `count` tasks as workerpool's producer writes them (unique id each)."""
        self._seq += 1
        now = time.time()
        prefix = f"{self._seq}-"
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, count, chunk):
            batch = [
                _dumps({"type": "bench", "data": {}, "id": prefix + str(i), "attempts": 0,
                        "enqueued_at": now})
                for i in range(start, min(count, start + chunk))
            ]
            pipe.lpush(KEY, *batch)
            if len(pipe) >= 20:
                pipe.execute()
        pipe.execute()

    def processing_total(self, pattern: str = "{" + KEY + "}:processing:*") -> int:
        return sum(self.client.llen(key) for key in self.client.scan_iter(match=pattern,
                                                                           count=1000))

    def check_state(self, pending: int, what: str) -> None:
        """Nothing lost, nothing extra: the exact max_tasks and at-least-once, in Redis terms."""
        left = self.client.llen(KEY)
        processing = self.processing_total() + self.processing_total(
            "{" + KEY + "}:baseline:*")
        dead = self.client.llen("{" + KEY + "}:dead")
        retry = self.client.zcard("{" + KEY + "}:retry")
        if (left, processing, dead, retry) != (pending, 0, 0, 0):
            raise BenchError(f"{what}: expected {pending} pending and nothing else, found "
                             f"pending={left} processing={processing} dead={dead} retry={retry}")

    def wait_processed(self, timeout: float) -> float:
        """Until the queue and every processing list are empty; returns the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            if self.client.llen(KEY) == 0 and self.processing_total() == 0:
                return time.monotonic() - start
            time.sleep(0.01)
        raise BenchError(f"tasks not processed within {timeout:g}s "
                         f"(pending {self.client.llen(KEY)})")

    def wait_blocked(self, clients: int, timeout: float = 15.0) -> None:
        """Until `clients` connections are blocked (idle consumers waiting in BLMOVE)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if int(self.client.info("clients")["blocked_clients"]) >= clients:
                return
            time.sleep(0.01)
        raise BenchError(f"{clients} blocked consumer(s) not seen within {timeout:g}s")

    # processes

    def pool(self, *, workers: int, concurrency: int, max_tasks: int = 0,
             handler: str = "bench.handlers:noop", env: dict[str, str] | None = None) -> Pool:
        self._seq += 1
        run_dir = os.path.join(self.tmp, f"pool-{self._seq}")
        os.makedirs(run_dir)
        ini = os.path.join(run_dir, "workerpool.ini")
        with open(ini, "w", encoding="utf-8") as handle:
            handle.write("[workerpool]\n"
                         f"redis_url = {self.server.url}\n"
                         f"redis_key = {KEY}\n"
                         f"handler = {handler}\n"
                         "log_level = WARNING\n"
                         f"pidfile = {run_dir}/workerpool.pid\n"
                         "host_id = bench\n")
        command = [PY, "-m", "workerpool.cli", "--config", ini, "start", "--foreground",
                   "--workers", str(workers), "--concurrency", str(concurrency),
                   "--max-tasks", str(max_tasks)]
        pool = Pool(command, run_dir, env)
        self.pools.append(pool)
        return pool

    def run_pool(self, tasks: int, *, workers: int, concurrency: int,
                 handler: str = "bench.handlers:noop", extra: int = 1000) -> Run:
        """Fill tasks + extra, run a pool with max_tasks = tasks from its start to its exit.

        The `extra` tasks must still be pending afterwards: max_tasks held exactly."""
        self.reset()
        self.fill(tasks + extra)
        meter = _Meter(self.server.process.pid)
        pool = self.pool(workers=workers, concurrency=concurrency, max_tasks=tasks,
                         handler=handler)
        code = pool.wait(RUN_TIMEOUT)
        run = meter.stop(tasks)
        if code != 0:
            raise BenchError(f"pool exited with {code}: {pool.log_tail()}")
        self.check_state(extra, f"pool {workers}x{concurrency}")
        return run

    def run_baseline(self, tasks: int, processes: int = 2, batch: int = 100) -> Run:
        """The batched reliable consumer: `processes` processes until the queue is empty."""
        self.reset()
        self.fill(tasks)
        meter = _Meter(self.server.process.pid)
        procs = [
            subprocess.Popen([PY, "-m", "bench.baseline", "batch", self.server.url, KEY, str(n),
                              "--batch", str(batch)], cwd=REPO, stdout=subprocess.PIPE)
            for n in range(processes)
        ]
        done = 0
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=RUN_TIMEOUT)
                done += int(out or 0)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        run = meter.stop(tasks)
        if done != tasks:
            raise BenchError(f"baseline handled {done} of {tasks} tasks")
        self.check_state(0, "baseline")
        return run


def _is_bench_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            title = handle.read()
    except OSError:
        return False
    return title.startswith(b"workerpool: worker") and f"[{KEY}]".encode() in title


class Pool:
    """One `workerpool start --foreground` process (the supervisor) and the workers it forks."""

    def __init__(self, command: list[str], run_dir: str, env: dict[str, str] | None) -> None:
        self.run_dir = run_dir
        self.log_path = os.path.join(run_dir, "stderr.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()/stop()
        full_env = dict(os.environ, **(env or {}))
        self.process = subprocess.Popen(command, cwd=REPO, env=full_env,
                                        stdout=subprocess.DEVNULL, stderr=self._log)
        self.pid = self.process.pid
        self.seen_workers: set[int] = set()

    def workers(self) -> list[int]:
        pids = children(self.pid)
        self.seen_workers.update(pids)
        return pids

    def wait_workers(self, count: int, timeout: float = 15.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) >= count:
                return pids
            if self.process.poll() is not None:
                break
            time.sleep(0.01)
        raise BenchError(f"{count} worker(s) not running within {timeout:g}s: {self.log_tail()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"pool did not exit within {timeout:g}s") from None
        finally:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain) and wait; SIGKILL by pid if it overruns."""
        self.workers()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        for pid in dict.fromkeys([*self.workers(), *self.seen_workers]):
            if _is_bench_worker(pid):  # not a recycled pid of someone else's process
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, size: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""


# --- the figures


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _describe(run: Run) -> str:
    return (f"{run.rate:,.0f}/s ({run.seconds:.2f}s; CPU {run.cpu_us:.1f} us/task + redis "
            f"{run.redis_us:.1f}; others busy {run.others:.2f} cores)")


def fig_throughput(bench: Bench, repeat: int, only_concurrency: int | None) -> dict[str, Any]:
    """Interleaved rounds (baseline, then the pool at each concurrency); best run of each."""
    tasks = bench.counts["throughput_tasks"]
    levels = (only_concurrency,) if only_concurrency else bench.counts["throughput_concurrency"]
    baseline: list[Run] = []
    pools: dict[int, list[Run]] = {c: [] for c in levels}
    for round_ in range(repeat):
        run = bench.run_baseline(tasks)
        baseline.append(run)
        bench.log(f"throughput round {round_ + 1}: baseline {_describe(run)}")
        for concurrency in levels:
            run = bench.run_pool(tasks, workers=2, concurrency=concurrency)
            pools[concurrency].append(run)
            bench.log(f"throughput round {round_ + 1}: pool 2 x {concurrency}: {_describe(run)}")
    best = {c: max(runs, key=lambda r: r.rate) for c, runs in pools.items()}
    best_c = max(levels, key=lambda c: best[c].rate)
    best_baseline = max(baseline, key=lambda r: r.rate)
    # The fixed part of a run (interpreter start, imports, connecting, forking, exiting):
    # the same command on a single task, best of 3.
    fixed_pool = min(bench.run_pool(1, workers=2, concurrency=best_c).seconds for _ in range(3))
    fixed_baseline = min(bench.run_baseline(1).seconds for _ in range(3))
    bench.log(f"throughput: fixed cost (1 task, start to exit): pool {fixed_pool:.3f}s, "
              f"baseline {fixed_baseline:.3f}s")
    return {
        "fixed_pool": fixed_pool,
        "fixed_baseline": fixed_baseline,
        "tasks": tasks,
        "baseline": best_baseline.rate,
        "baseline_best": best_baseline,
        "baseline_runs": baseline,
        "best": best,
        "runs": pools,
        "concurrency": best_c,
        "rate": best[best_c].rate,
    }


def _read_samples(path: str) -> list[tuple[int, float]]:
    """(task id, delay in seconds) lines written by bench.handlers.latency or the baseline."""
    with open(path, encoding="ascii") as handle:
        return [(int(task_id), float(delay))
                for task_id, delay in (line.split() for line in handle if line.strip())]


def _read_delays(directory: str) -> list[tuple[int, float]]:
    delays: list[tuple[int, float]] = []
    for name in os.listdir(directory):
        delays += _read_samples(os.path.join(directory, name))
    return delays


def _produce_timed(bench: Bench, keys: tuple[str, ...], count: int, period: float) -> None:
    """`count` tasks to each key, one every `period` seconds per key, the keys taking turns
    (evenly spaced); each task carries time.time() taken right before its LPUSH."""
    client = bench.server.client(socket_timeout=10)
    step = period / len(keys)
    try:
        client.ping()
        due = time.perf_counter()
        for i in range(count * len(keys)):
            due += step
            client.lpush(keys[i % len(keys)], _dumps({"type": "latency", "data": {},
                                                      "id": str(i), "t": time.time()}))
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    finally:
        client.close()


def _wait_lines(directory: str, count: int, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        delays = _read_delays(directory)
        if len(delays) >= count or time.monotonic() > deadline:
            return delays
        time.sleep(0.05)


def _summary(samples: list[tuple[int, float]], expected: int, what: str) -> dict[str, Any]:
    if len(samples) != expected:
        raise BenchError(f"{what}: {len(samples)} of {expected} tasks recorded")
    ms = [delay * 1000 for _, delay in samples]
    return {"p50": statistics.median(ms), "p99": percentile(ms, 0.99), "max": max(ms),
            "n": len(ms), "samples_ms": {task_id: delay * 1000 for task_id, delay in samples}}


LATENCY_BASELINE_KEY = "bench:latency-baseline"


def fig_latency(bench: Bench) -> dict[str, Any]:
    """The pool and the baseline consumer, both idle, measured in the same window: the producer
    alternates between their queues (each gets one task every 20 ms, 10 ms apart), so machine
    noise hits both alike."""
    count = bench.counts["latency_tasks"]
    period = 0.020
    bench.reset()
    directory = os.path.join(bench.tmp, "latency")
    os.makedirs(directory)
    out = os.path.join(bench.tmp, "baseline-latency.txt")
    pool = bench.pool(workers=2, concurrency=10, handler="bench.handlers:latency",
                      env={"BENCH_LATENCY_DIR": directory})
    consumer = None
    try:
        pool.wait_workers(2)
        bench.wait_blocked(2)
        consumer = subprocess.Popen(
            [PY, "-m", "bench.baseline", "blmove", bench.server.url, LATENCY_BASELINE_KEY,
             "latency", str(count), out, "--max-seconds", str(count * period + 30)], cwd=REPO)
        bench.wait_blocked(3)
        time.sleep(1.5)  # past a housekeeping round and a BLMOVE timeout: truly idle
        busy0, start = system_busy(), time.perf_counter()
        _produce_timed(bench, (KEY, LATENCY_BASELINE_KEY), count, period)
        delays = _wait_lines(directory, count, 10.0)
        consumer.wait(30)
        others = (system_busy() - busy0) / (time.perf_counter() - start)
    finally:
        if consumer is not None and consumer.poll() is None:
            consumer.kill()
            consumer.wait()
        code = pool.stop()
    if code != 0:
        raise BenchError(f"latency pool exited with {code}: {pool.log_tail()}")
    result = _summary(delays, count, "pool latency")
    bench.check_state(0, "pool latency")
    baseline = _summary(_read_samples(out), count, "baseline latency")
    left = bench.client.llen(LATENCY_BASELINE_KEY) + bench.processing_total(
        "{" + LATENCY_BASELINE_KEY + "}:baseline:*")
    if left:
        raise BenchError(f"baseline latency: {left} task(s) left in Redis")
    bench.log(f"latency: pool p50 {result['p50']:.3f} ms, p99 {result['p99']:.3f} ms; "
              f"baseline p50 {baseline['p50']:.3f} ms, p99 {baseline['p99']:.3f} ms; "
              f"machine busy {others:.2f} cores")
    return {"tasks": count, "period_ms": period * 1000, "pool": result, "baseline": baseline,
            "busy_cores": others}


def fig_idle(bench: Bench) -> dict[str, Any]:
    window = bench.counts["idle_window"]
    bench.reset()
    pool = bench.pool(workers=2, concurrency=10)
    try:
        workers = pool.wait_workers(2)
        bench.wait_blocked(2)
        time.sleep(2.0)
        pids = [pool.pid, *workers]
        cpu0 = [cpu_seconds(pid) for pid in pids]
        ns0 = [run_ns(pid) for pid in pids]
        busy0 = system_busy()
        time.sleep(window)
        cpu1 = [cpu_seconds(pid) for pid in pids]
        ns1 = [run_ns(pid) for pid in pids]
        others = (system_busy() - busy0) / window
        if pool.workers() != workers:
            raise BenchError("a worker was replaced during the idle window")
    finally:
        code = pool.stop()
    if code != 0:
        raise BenchError(f"idle pool exited with {code}: {pool.log_tail()}")
    scale = 10.0 / window
    per_process = [(b - a) * scale for a, b in zip(cpu0, cpu1, strict=True)]
    precise = [(b - a) / 1e9 * scale for a, b in zip(ns0, ns1, strict=True)]
    result = {"window": window, "cpu_s_per_10s": sum(per_process),
              "schedstat_s_per_10s": sum(precise),
              "supervisor": precise[0], "workers": precise[1:], "busy_cores": others}
    bench.log(f"idle: {result['cpu_s_per_10s']:.3f} CPU-s/10s (stat), "
              f"{result['schedstat_s_per_10s']:.4f} (schedstat); per process {precise}")
    return result


def fig_memory(bench: Bench, concurrency: int) -> dict[str, Any]:
    first, middle, last = bench.counts["memory_steps"]
    bench.reset()
    pool = bench.pool(workers=2, concurrency=concurrency)
    samples: list[dict[int, int]] = []
    try:
        workers = pool.wait_workers(2)
        bench.wait_blocked(2)
        for step, count in enumerate((first, middle, last)):
            bench.fill(count)
            bench.wait_processed(RUN_TIMEOUT)
            if step != 1:
                time.sleep(0.3)
                samples.append({pid: pss_kib(pid) for pid in workers})
        if sorted(pool.workers()) != sorted(workers):
            raise BenchError("a worker was replaced during the memory run")
    finally:
        code = pool.stop()
    if code != 0:
        raise BenchError(f"memory pool exited with {code}: {pool.log_tail()}")
    bench.check_state(0, "memory")
    after_first, after_last = samples
    growth = {pid: (after_last[pid] - after_first[pid]) / 1024 for pid in workers}
    result = {
        "tasks": first + middle + last,
        "concurrency": concurrency,
        "pss_first_mib": {pid: kib / 1024 for pid, kib in after_first.items()},
        "pss_last_mib": {pid: kib / 1024 for pid, kib in after_last.items()},
        "pss_mib": max(after_last.values()) / 1024,
        "growth_mib": max(growth.values()),
    }
    bench.log(f"memory: PSS after first {first}: {result['pss_first_mib']}, after all: "
              f"{result['pss_last_mib']}")
    return result


def fig_scaling(bench: Bench, concurrency: int) -> dict[str, Any]:
    tasks = bench.counts["scaling_tasks"]
    by_workers = {}
    for workers in (1, 2, 4):
        run = max((bench.run_pool(tasks, workers=workers, concurrency=concurrency)
                   for _ in range(2)), key=lambda r: r.rate)
        by_workers[workers] = run
        bench.log(f"scaling: {workers} worker(s) x {concurrency}: {_describe(run)}")
    by_concurrency = {}
    for level, count in bench.counts["sleep_tasks"].items():
        run = bench.run_pool(count, workers=2, concurrency=level,
                             handler="bench.handlers:sleep_1ms")
        by_concurrency[level] = run
        bench.log(f"scaling: sleep 1 ms, 2 x {level}: {_describe(run)}")
    return {"tasks": tasks, "concurrency": concurrency, "by_workers": by_workers,
            "sleep_by_concurrency": by_concurrency}


# --- report


def _table(headers: list[str], rows: Iterable[list[str]]) -> str:
    rows = [headers, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row))
                     + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(results: dict[str, Any]) -> str:
    out = []
    rows = []
    if "throughput" in results:
        t = results["throughput"]
        ratio = t["rate"] / t["baseline"]
        rows.append([f"throughput, {t['tasks']:,} no-op tasks, 2 workers x {t['concurrency']} "
                     "(start to exit)",
                     f"{t['rate']:,.0f} tasks/s", f"{t['baseline']:,.0f} tasks/s",
                     f"{ratio:.0%}", ">= 60,000/s and >= 70%",
                     _met(t["rate"] >= TARGET_RATE and ratio >= TARGET_RATIO)])
    if "latency" in results:
        lat = results["latency"]
        pool, base = lat["pool"], lat["baseline"]
        for name, target in (("p50", TARGET_P50), ("p99", TARGET_P99)):
            rows.append([f"latency {name}, enqueue to handler start ({lat['tasks']} tasks, "
                         f"1 per {lat['period_ms']:g} ms; machine busy "
                         f"{lat['busy_cores']:.2f} cores)",
                         f"{pool[name]:.3f} ms", f"{base[name]:.3f} ms",
                         f"{pool[name] / base[name]:.2f}x", f"< {target:g} ms",
                         _met(pool[name] < target)])
    if "idle" in results:
        idle = results["idle"]
        rows.append([f"idle cost, supervisor + 2 workers, CPU-s per 10 s (machine busy "
                     f"{idle['busy_cores']:.2f} cores)",
                     f"{idle['cpu_s_per_10s']:.3f} s ({idle['schedstat_s_per_10s']:.4f} s "
                     "schedstat)", "-", "-", f"< {TARGET_IDLE:g} s",
                     _met(idle["cpu_s_per_10s"] < TARGET_IDLE
                          and idle["schedstat_s_per_10s"] < TARGET_IDLE)])
    if "memory" in results:
        mem = results["memory"]
        rows.append([f"memory, PSS per worker after {mem['tasks']:,} tasks",
                     f"{mem['pss_mib']:.1f} MiB", "-", "-", f"< {TARGET_PSS:g} MiB",
                     _met(mem["pss_mib"] < TARGET_PSS)])
        rows.append(["memory growth, first to last 10% of tasks (worst worker)",
                     f"{mem['growth_mib']:+.2f} MiB", "-", "-", f"< {TARGET_GROWTH:g} MiB",
                     _met(mem["growth_mib"] < TARGET_GROWTH)])
    if rows:
        out.append(_table(["figure", "workerpool", "baseline (same run)", "ratio", "target",
                           "result"], rows))
    if "throughput" in results:
        t = results["throughput"]
        out.append("")

        def row(name: str, best: Run, runs: list[Run], fixed: float) -> list[str]:
            steady = best.tasks / (best.seconds - fixed) if best.seconds > fixed else 0.0
            return [name, f"{best.rate:,.0f}", f"{best.rate / t['baseline']:.0%}",
                    ", ".join(f"{r.rate:,.0f}" for r in runs),
                    f"{steady:,.0f} (-{fixed:.2f} s)",
                    f"{best.cpu_us:.1f} + {best.redis_us:.1f}", f"{best.others:.2f}"]

        out.append(_table(
            ["2 processes", "best tasks/s", "vs baseline", "all runs (tasks/s)",
             "without start-up and exit", "CPU us/task (procs + redis), best run",
             "others busy (cores)"],
            [row(f"workerpool, concurrency {c}", t["best"][c], t["runs"][c], t["fixed_pool"])
             for c in t["best"]]
            + [row("baseline, batch 100", t["baseline_best"], t["baseline_runs"],
                   t["fixed_baseline"])]))
    if "scaling" in results:
        s = results["scaling"]
        out.append("")
        one = s["by_workers"][1].rate
        out.append(_table(
            ["workers", f"no-op tasks/s ({s['tasks']:,} tasks, concurrency {s['concurrency']}, "
                        "best of 2)",
             "vs 1 worker", "CPU us/task (procs + redis)", "others busy (cores)"],
            [[str(w), f"{run.rate:,.0f}", f"{run.rate / one:.2f}x",
              f"{run.cpu_us:.1f} + {run.redis_us:.1f}", f"{run.others:.2f}"]
             for w, run in s["by_workers"].items()]))
        out.append("")
        out.append(_table(
            ["concurrency", "tasks/s, handler awaits 1 ms (2 workers)", "tasks", "seconds",
             "ceiling (2 x c / 1 ms)", "others busy (cores)"],
            [[str(c), f"{run.rate:,.0f}", f"{run.tasks:,}", f"{run.seconds:.2f}",
              f"{2 * c * 1000:,}", f"{run.others:.2f}"]
             for c, run in s["sleep_by_concurrency"].items()]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts (about 30 s): a smoke test")
    parser.add_argument("--only", help="comma-separated figures: " + ", ".join(FIGURES))
    parser.add_argument("--concurrency", type=int,
                        help="use this concurrency instead of trying several")
    parser.add_argument("--repeat", type=int, default=None,
                        help="throughput rounds, best kept for pool and baseline alike "
                             "(default 5, 1 with --quick)")
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    only = FIGURES if not args.only else tuple(name.strip() for name in args.only.split(","))
    unknown = [name for name in only if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    repeat = args.repeat or (1 if args.quick else 5)

    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    load = os.getloadavg()[0]
    info["loadavg_at_start"] = f"{load:.2f}"
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: other work shares the CPUs "
              "and the figures will be noisy (see the 'others busy' columns)", flush=True)
    tmp = tempfile.mkdtemp(prefix="workerpool-bench-")
    server = RedisServer()
    print(f"redis-server pid {server.process.pid} on 127.0.0.1:{server.port}", flush=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    bench = Bench(server, tmp, args.quick, log)
    results: dict[str, Any] = {"machine": info, "quick": args.quick}
    failures: list[str] = []
    concurrency = args.concurrency or 200
    try:
        for name in only:
            try:
                if name == "throughput":
                    results[name] = fig_throughput(bench, repeat, args.concurrency)
                    concurrency = results[name]["concurrency"]
                elif name == "latency":
                    results[name] = fig_latency(bench)
                elif name == "idle":
                    results[name] = fig_idle(bench)
                elif name == "memory":
                    results[name] = fig_memory(bench, concurrency)
                elif name == "scaling":
                    results[name] = fig_scaling(bench, concurrency)
            except BenchError as exc:
                failures.append(f"{name}: {exc}")
                log(f"{name} FAILED: {exc}")
    finally:
        bench.kill_leftovers()
        bench.client.close()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    print()
    print(report(results))
    if args.quick:
        print("\n--quick: smaller counts. The targets are defined for the full counts; with 30,000 "
              "tasks the fixed start-up (about 0.4 s) weighs three times as much in the "
              "throughput figure, and one run is not a best of five.")
    print(f"\ntotal {results['seconds']:.0f}s")
    for failure in failures:
        print(f"FAILED {failure}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2,
                      default=lambda o: dataclasses.asdict(o) if isinstance(o, Run) else str(o))
    return 1 if failures else 0
