"""Prometheus metrics, served by the supervisor from shared memory (`[metrics] port`).

The HTTP endpoint is served from the supervisor's own select() loop, not from a thread: the
supervisor forks workers all its life, and a thread holding a lock at fork time would leave
that lock held forever in the child. A scrape is small and answered at once.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from workerpool.scoreboard import DURATION_BUCKETS, TYPE_COUNTERS

log = logging.getLogger("workerpool.metrics")

# handle() runs inside the supervisor's loop: what it may spend there per call, whatever the
# clients do (a client that connects and sends nothing is dropped, not waited for).
HANDLE_BUDGET = 0.25
MAX_CONNECTIONS_PER_CALL = 8


@dataclass
class MetricsSnapshot:
    """Everything one scrape reports."""

    by_type: dict[str, list[int]] = field(default_factory=dict)
    histogram: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_sum: float = 0.0
    gauges: dict[str, float] = field(default_factory=dict)

    def add(self, by_type: dict[str, list[int]], histogram: list[int], duration_sum: float) -> None:
        """Fold one worker's counters into the totals."""
        for name, counters in by_type.items():
            total = self.by_type.setdefault(name, [0] * len(TYPE_COUNTERS))
            for i, value in enumerate(counters):
                total[i] += value
        for i, count in enumerate(histogram):
            self.histogram[i] += count
        self.duration_sum += duration_sum

    def copy(self) -> MetricsSnapshot:
        clone = MetricsSnapshot()
        clone.add(self.by_type, self.histogram, self.duration_sum)
        return clone


GAUGE_HELP = {
    "workers": "Worker processes running",
    "in_flight": "Tasks being run by the workers now",
    "pending": "Tasks waiting in the queue",
    "processing": "Tasks in this host's processing lists",
    "retry": "Tasks waiting for a retry",
    "dead": "Dead-lettered tasks",
    "max_tasks_finished": "Tasks finished toward max_tasks",
}


class _Collector:
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        current = self.snapshot()
        for i, counter in enumerate(TYPE_COUNTERS):
            family = CounterMetricFamily(f"workerpool_tasks_{counter}",
                                         f"Tasks {counter}, by task type", labels=["type"])
            for name, counters in sorted(current.by_type.items()):
                family.add_metric([name], counters[i])
            yield family
        for name, value in current.gauges.items():
            yield GaugeMetricFamily(f"workerpool_{name}", GAUGE_HELP.get(name, name), value=value)
        buckets, cumulative = [], 0
        for bound, count in zip(DURATION_BUCKETS, current.histogram, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily("workerpool_task_duration_seconds",
                                    "Time handlers took, successful or not",
                                    buckets=buckets, sum_value=current.duration_sum)


class MetricsServer:
    """A listening socket whose requests the supervisor's loop answers one at a time."""

    def __init__(self, bind: str, port: int, snapshot: Callable[[], MetricsSnapshot]) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(snapshot))
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((bind, port))
        self.socket.listen(16)
        self.socket.setblocking(False)
        self.address = self.socket.getsockname()[:2]

    def fileno(self) -> int:
        return self.socket.fileno()

    def handle(self) -> None:
        """Answer the connections waiting now (called when the socket is readable), spending
        at most about HANDLE_BUDGET seconds; connections left over wait for the next call."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        deadline = time.monotonic() + HANDLE_BUDGET
        for _ in range(MAX_CONNECTIONS_PER_CALL):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                connection, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            with connection:
                try:
                    connection.settimeout(remaining)
                    request = connection.recv(4096)
                    path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
                    if path.split(b"?")[0] not in (b"/", b"/metrics"):
                        status, body, kind = b"404 Not Found", b"not found\n", b"text/plain"
                    else:
                        status, body = b"200 OK", generate_latest(self.registry)
                        kind = CONTENT_TYPE_LATEST.encode()
                    connection.sendall(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind
                                       + b"\r\nContent-Length: " + str(len(body)).encode()
                                       + b"\r\nConnection: close\r\n\r\n" + body)
                except OSError as exc:
                    log.debug("metrics request failed: %s", exc)

    def close(self) -> None:
        self.socket.close()
