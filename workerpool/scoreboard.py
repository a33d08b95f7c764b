"""Shared memory between the supervisor and its workers: global counters and one slot per worker.

An anonymous shared mmap is created before fork. Each slot field has one writer (its worker,
or the supervisor while the worker is not running), so slots need no lock. The global
max-tasks budget is read-modify-write across processes: it is guarded by an fcntl record
lock, which the kernel releases when its holder dies, so a worker killed with SIGKILL inside
the critical section cannot wedge the pool.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass

# Global header: taken (slots handed out and not returned), finished (acked or dead-lettered),
# max_tasks (0 = unlimited), supervisor pid, supervisor start time (unix).
_HEADER = struct.Struct("<qqqqd")
_HEADER_SIZE = 64

# One worker slot. `holding` is how many global slots the worker holds (reserved, taken,
# not yet finished or returned); the supervisor gives them back when the worker dies.
# `settling` tasks finished in the settlement being written, whose token is `settle_token`:
# if the worker dies with it in flight, Redis tells whether it was applied.
_SLOT = struct.Struct("<qqdqqqdqdqqQ")
_SLOT_SIZE = 128
_FIELDS = (
    "pid",
    "state",
    "heartbeat",
    "processed",
    "failed",
    "in_flight",
    "busy_since",
    "holding",
    "started_at",
    "generation",
    "settling",
    "settle_token",
)
_OFFSET = {name: struct.calcsize("<" + "".join(_SLOT.format[1:][:i])) for i, name in
           enumerate(_FIELDS)}
_FORMAT = {name: "<" + _SLOT.format[1:][i] for i, name in enumerate(_FIELDS)}

# Per-slot metrics, written by the worker about once a second (single writer): up to
# TYPE_ROWS task types, each a name and counters, then a histogram of task durations, then
# how many type rows are in use (a name cannot mark the end: the type "" is all NUL bytes).
TYPE_ROWS = 32
TYPE_NAME_BYTES = 40
TYPE_COUNTERS = ("taken", "succeeded", "failed", "retried", "dead")
_TYPE_ROW = struct.Struct(f"<{TYPE_NAME_BYTES}s{len(TYPE_COUNTERS)}q")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, float("inf"))
_HISTOGRAM = struct.Struct(f"<{len(DURATION_BUCKETS)}qd")
_ROW_COUNT = struct.Struct("<q")
_METRICS_SIZE = TYPE_ROWS * _TYPE_ROW.size + _HISTOGRAM.size + _ROW_COUNT.size
OTHER_TYPES = "(other)"  # where types beyond TYPE_ROWS are counted

FREE, STARTING, IDLE, BUSY, DRAINING, STOPPED = range(6)
STATE_NAMES = ("free", "starting", "idle", "busy", "draining", "stopped")


@dataclass
class SlotView:
    """A snapshot of one worker slot."""

    index: int
    pid: int
    state: int
    heartbeat: float
    processed: int
    failed: int
    in_flight: int
    busy_since: float
    holding: int
    started_at: float
    generation: int
    settling: int
    settle_token: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state] if 0 <= self.state < len(STATE_NAMES) else "?"


class Scoreboard:
    """Counters shared by the supervisor and every worker it forks."""

    def __init__(self, slots: int, max_tasks: int = 0) -> None:
        self.slots = slots
        self._metrics_at = _HEADER_SIZE + slots * _SLOT_SIZE
        self._memory = mmap.mmap(-1, self._metrics_at + slots * _METRICS_SIZE)
        self._lock_file = tempfile.TemporaryFile(prefix="workerpool-lock-")
        _HEADER.pack_into(self._memory, 0, 0, 0, max_tasks, os.getpid(), time.time())

    # --- global budget (exact max_tasks)

    def _locked(self) -> _Lock:
        return _Lock(self._lock_file.fileno())

    @property
    def max_tasks(self) -> int:
        return _HEADER.unpack_from(self._memory, 0)[2]

    def set_max_tasks(self, max_tasks: int) -> None:
        struct.pack_into("<q", self._memory, 16, max_tasks)

    def totals(self) -> tuple[int, int, int]:
        """(taken, finished, max_tasks)."""
        taken, finished, max_tasks, _, _ = _HEADER.unpack_from(self._memory, 0)
        return taken, finished, max_tasks

    @property
    def supervisor_started(self) -> float:
        return _HEADER.unpack_from(self._memory, 0)[4]

    def reserve(self, index: int, wanted: int) -> int:
        """Reserve up to `wanted` task slots for worker `index`; returns how many were granted."""
        if wanted <= 0:
            return 0
        if self.max_tasks == 0:
            self._add(index, "holding", wanted)
            return wanted
        with self._locked():
            taken, finished, max_tasks, _, _ = _HEADER.unpack_from(self._memory, 0)
            granted = max(0, min(wanted, max_tasks - taken))
            if granted:
                struct.pack_into("<q", self._memory, 0, taken + granted)
                self._add(index, "holding", granted)
        return granted

    def release(self, index: int, count: int) -> None:
        """Give back `count` reserved slots that were not used or whose tasks went back."""
        if count <= 0:
            return
        if self.max_tasks == 0:
            self._add(index, "holding", -count)
            return
        with self._locked():
            taken = struct.unpack_from("<q", self._memory, 0)[0]
            struct.pack_into("<q", self._memory, 0, taken - count)
            self._add(index, "holding", -count)

    def finish(self, index: int, count: int) -> None:
        """Record `count` tasks finished for good (acked or dead-lettered): the worker's
        settlement in flight (`settling`) is accounted for."""
        if self.max_tasks == 0 or count <= 0:
            self._add(index, "holding", -count)
            self.set(index, "settling", 0)
            return
        with self._locked():
            finished = struct.unpack_from("<q", self._memory, 8)[0]
            struct.pack_into("<q", self._memory, 8, finished + count)
            self._add(index, "holding", -count)
            self.set(index, "settling", 0)

    def budget_spent(self) -> bool:
        """True when max_tasks is set and that many tasks have finished."""
        taken, finished, max_tasks = self.totals()
        return max_tasks > 0 and finished >= max_tasks

    def budget_exhausted(self) -> bool:
        """True when no slot is left to reserve now (more may come back from retries)."""
        taken, _, max_tasks = self.totals()
        return max_tasks > 0 and taken >= max_tasks

    def finish_settlement(self, index: int, applied_token: int | None) -> int:
        """For a dead worker: count the tasks of the settlement it had in flight as finished
        if Redis applied it (its token is the list's last applied one); returns how many."""
        settling = int(self.get(index, "settling"))
        if settling <= 0 or applied_token != self.get(index, "settle_token"):
            return 0
        self.finish(index, settling)
        self.add(index, "processed", settling)
        return settling

    def reclaim(self, index: int, keep: int = 0) -> int:
        """Return the slots a dead worker held to the global budget but `keep` of them (they
        wait for resolve_kept()); returns how many went back."""
        with self._locked():
            holding = self.get(index, "holding")
            returned = max(0, holding - keep)
            if returned and self.max_tasks:
                taken = struct.unpack_from("<q", self._memory, 0)[0]
                struct.pack_into("<q", self._memory, 0, taken - returned)
            self.set(index, "holding", 0)
        return returned

    def resolve_kept(self, count: int, finished: bool) -> None:
        """Settle slots reclaim() kept: their tasks finished, or they go back to the budget."""
        with self._locked():
            offset = 8 if finished else 0
            value = struct.unpack_from("<q", self._memory, offset)[0]
            struct.pack_into("<q", self._memory, offset, value + (count if finished else -count))

    # --- slots

    def get(self, index: int, name: str) -> int | float:
        return struct.unpack_from(_FORMAT[name], self._memory, self._at(index, name))[0]

    def set(self, index: int, name: str, value: int | float) -> None:
        struct.pack_into(_FORMAT[name], self._memory, self._at(index, name), value)

    def _add(self, index: int, name: str, delta: int) -> None:
        offset = self._at(index, name)
        struct.pack_into("<q", self._memory, offset,
                         struct.unpack_from("<q", self._memory, offset)[0] + delta)

    def add(self, index: int, name: str, delta: int) -> None:
        """Add to one of the worker's own integer fields (single writer: no lock)."""
        self._add(index, name, delta)

    def _at(self, index: int, name: str) -> int:
        if not 0 <= index < self.slots:
            raise IndexError(f"worker slot {index} out of range 0..{self.slots - 1}")
        return _HEADER_SIZE + index * _SLOT_SIZE + _OFFSET[name]

    def clear_slot(self, index: int) -> None:
        _SLOT.pack_into(self._memory, _HEADER_SIZE + index * _SLOT_SIZE, *([0] * len(_FIELDS)))
        start = self._metrics_at + index * _METRICS_SIZE
        self._memory[start : start + _METRICS_SIZE] = bytes(_METRICS_SIZE)

    # --- metrics

    def publish_metrics(self, index: int, by_type: dict[str, list[int]],
                        histogram: list[int], duration_sum: float) -> None:
        """Write a worker's cumulative counters (by task type) and duration histogram."""
        start = self._metrics_at + index * _METRICS_SIZE
        rows = list(by_type.items())
        if len(rows) > TYPE_ROWS:
            # Keep the first TYPE_ROWS - 1 types; fold the rest (and any earlier "other")
            # into one row.
            named = [row for row in rows if row[0] != OTHER_TYPES][: TYPE_ROWS - 1]
            kept = {name for name, _ in named}
            folded = [counters for name, counters in rows if name not in kept]
            other = [sum(column) for column in zip(*folded, strict=True)]
            rows = named + [(OTHER_TYPES, other)]
        for row, (name, counters) in enumerate(rows):
            encoded = name.encode("utf-8", "replace")[:TYPE_NAME_BYTES]
            _TYPE_ROW.pack_into(self._memory, start + row * _TYPE_ROW.size, encoded, *counters)
        _HISTOGRAM.pack_into(self._memory, start + TYPE_ROWS * _TYPE_ROW.size,
                             *histogram, duration_sum)
        _ROW_COUNT.pack_into(self._memory, start + TYPE_ROWS * _TYPE_ROW.size + _HISTOGRAM.size,
                             len(rows))

    def read_metrics(self, index: int) -> tuple[dict[str, list[int]], list[int], float]:
        """A worker's published counters by type, its histogram counts and duration sum."""
        start = self._metrics_at + index * _METRICS_SIZE
        by_type: dict[str, list[int]] = {}
        (rows,) = _ROW_COUNT.unpack_from(
            self._memory, start + TYPE_ROWS * _TYPE_ROW.size + _HISTOGRAM.size)
        for row in range(min(rows, TYPE_ROWS)):
            name, *counters = _TYPE_ROW.unpack_from(self._memory, start + row * _TYPE_ROW.size)
            by_type[name.rstrip(b"\0").decode("utf-8", "replace")] = counters
        *histogram, duration_sum = _HISTOGRAM.unpack_from(
            self._memory, start + TYPE_ROWS * _TYPE_ROW.size)
        return by_type, histogram, duration_sum

    def claim_slot(self, index: int, pid: int, generation: int) -> None:
        """Set up a slot for a newly forked worker (called by the supervisor)."""
        now = time.monotonic()
        _SLOT.pack_into(self._memory, _HEADER_SIZE + index * _SLOT_SIZE,
                        pid, STARTING, now, 0, 0, 0, 0.0, 0, time.time(), generation, 0, 0)

    def slot(self, index: int) -> SlotView:
        values = _SLOT.unpack_from(self._memory, _HEADER_SIZE + index * _SLOT_SIZE)
        return SlotView(index, *values)

    def beat(self, index: int) -> None:
        """Record that the worker's event loop is alive."""
        struct.pack_into("<d", self._memory, self._at(index, "heartbeat"), time.monotonic())

    def free_slot(self) -> int | None:
        """The lowest slot no worker uses, or None."""
        for index in range(self.slots):
            if self.get(index, "state") == FREE and self.get(index, "pid") == 0:
                return index
        return None

    def close(self) -> None:
        self._memory.close()
        self._lock_file.close()


class _Lock:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
