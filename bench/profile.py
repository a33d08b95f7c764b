"""Profile the worker hot path with py-spy: `python -m bench.profile [--seconds S]`.

Starts a private Redis and a pool of 2 workers (no-op handler) through the real CLI on a queue
full of tasks, samples both workers with py-spy while they are busy, stops everything it started
and prints where the time goes: by leaf frame, grouped into categories, and the top functions
(self and inclusive). Needs py-spy (`pip install py-spy`); the sampling itself slows the workers
down somewhat, so read the shares, not the rate.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench.run import Bench, BenchError, RedisServer

CATEGORIES = (
    # (name, test on the leaf frame "function (file)")
    ("event loop: Task creation and steps, callbacks, epoll (uvloop and _asyncio, C code)",
     lambda leaf: leaf.startswith(("run_worker ", "Worker._task_factory"))),
    ("socket writes: the send syscall, loopback TCP runs in the sender's kernel time",
     lambda leaf: leaf.startswith("StreamWriter.writelines ")),
    ("redis-py: command packing, connection pool, reply parsing (hiredis)",
     lambda leaf: "(redis/" in leaf),
    ("asyncio in Python: Task registration (WeakSet), timeouts, sleep(0)",
     lambda leaf: "(asyncio/" in leaf or "_weakrefset" in leaf),
    ("decoding tasks (orjson) and checking them",
     lambda leaf: leaf.startswith("decode_task ")),
    ("workerpool's own Python code (fetch loop, batch start, run, settle, scoreboard)",
     lambda leaf: "(workerpool/" in leaf),
    ("the handler (no-op)", lambda leaf: "(bench/handlers.py)" in leaf),
)


def summarize(paths: list[str], top: int = 15) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                samples = int(count)
                total += samples
                frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
                self_time[frames[-1]] += samples
                for frame in set(frames):
                    inclusive[frame] += samples
    if not total:
        return "no samples"
    by_category: collections.Counter[str] = collections.Counter()
    for leaf, samples in self_time.items():
        for name, test in CATEGORIES:
            if test(leaf):
                by_category[name] += samples
                break
        else:
            by_category["other"] += samples
    out = [f"{total} samples from {len(paths)} worker(s)", "", "by category (leaf frame):"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_category.most_common()]
    out += ["", "top functions, self time:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    out += ["", "top functions, inclusive (below the worker's main loop):"]
    skip = ("<module>", "_run_module_as_main", "_run_code", "main ", "cmd_start", "Supervisor.",
            "run_worker ")
    shown = [(name, n) for name, n in inclusive.most_common() if not name.startswith(skip)]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in shown[:top]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--tasks", type=int, default=600_000)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="workerpool-profile-")
    server = RedisServer()
    pool = None
    bench = Bench(server, tmp, False, print)
    try:
        bench.reset()
        bench.fill(args.tasks)
        pool = bench.pool(workers=2, concurrency=args.concurrency, max_tasks=args.tasks)
        workers = pool.wait_workers(2)
        deadline = time.monotonic() + 15
        while bench.client.llen("bench:q") >= args.tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        outputs = [os.path.join(tmp, f"worker-{pid}.txt") for pid in workers]
        samplers = [
            subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration",
                              str(max(1, round(args.seconds))), "--rate", str(args.rate),
                              "--format", "raw", "--output", out],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for pid, out in zip(workers, outputs, strict=True)
        ]
        for sampler in samplers:
            try:
                sampler.wait(args.seconds + 30)
            except subprocess.TimeoutExpired:
                sampler.kill()
                sampler.wait()
        left = bench.client.llen("bench:q")
        found = [out for out in outputs if os.path.exists(out)]
        if not found:
            errors = b"".join(s.stderr.read() for s in samplers if s.stderr)
            raise BenchError(f"py-spy recorded nothing: {errors.decode(errors='replace')}")
        print(f"pool 2 workers x {args.concurrency}, {args.tasks - left:,} tasks done while "
              "sampled and before")
        print(summarize(found))
    finally:
        if pool is not None:
            try:
                pool.stop()
            except BenchError:
                pass
        bench.kill_leftovers()
        bench.client.close()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
