"""Prometheus metrics of fedq's processes: the metric objects, the calls that move them, and
``serve(port)``, the HTTP endpoint (``--metrics-port``; 127.0.0.1 by default).

Importing this module does no I/O: metrics are recorded in the process's default registry
whether or not anything serves them (an increment is the whole cost on the hot path), and
only ``serve`` opens a socket. The ``job`` label is fedq's job id: scrape with
``honor_labels: true``, or Prometheus renames it ``exported_job`` beside its own scrape job.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from shared.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
MAX_LATENCY = 7 * 24 * 3600.0  # seconds: a latency beyond a week is a worker's clock or word, not a delay

# -- the aggregator -------------------------------------------------------------------------------
UPDATES_ACCEPTED = Counter(
    "fedq_updates_accepted", "Updates applied in a stored version (acked), as the ledger's applied.", ["job"]
)
UPDATES_REJECTED = Counter(
    "fedq_updates_rejected", "Updates dead-lettered by the aggregator, by reason.", ["job", "reason"]
)
VERSIONS_MADE = Counter("fedq_versions", "Versions this aggregator stored.", ["job"])
STALENESS = Histogram(
    "fedq_update_staleness",
    "Staleness (versions behind) of each applied update.",
    ["job"],
    buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34, 55),
)
LATENCY = Histogram(
    "fedq_update_latency_seconds",
    "Seconds from an update's sent_at (the worker's clock) to the stored version that applied it.",
    ["job"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
# -- the coordinator and the aggregator ----------------------------------------------------------
VERSION = Gauge(
    "fedq_version", "The current model version: made (aggregator) or adopted (coordinator).", ["job", "role"]
)
# -- every role -----------------------------------------------------------------------------------
BYTES_IN = Counter(
    "fedq_received_bytes",
    "Bytes received: updates (aggregator), models (coordinator: versions adopted; worker: tasks and models).",
    ["job", "role"],
)
BYTES_OUT = Counter(
    "fedq_sent_bytes",
    "Bytes sent: tasks (coordinator), versions stored (aggregator), updates (worker).",
    ["job", "role"],
)
STARTS = Counter(
    "fedq_service_starts", "Starts of a fedq service in this process (1 per process start).", ["role"]
)
# -- the worker -----------------------------------------------------------------------------------
TRAINING_SECONDS = Histogram(
    "fedq_training_seconds",
    "Seconds of local training per task.",
    ["job"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
# -- the coordinator ------------------------------------------------------------------------------
WORKERS_LIVE = Gauge(
    "fedq_workers_live", "Live workers (heard within --worker-timeout) by capability.", ["job", "capability"]
)
TASKS_ISSUED = Counter("fedq_tasks_issued", "Tasks published.", ["job", "capability"])
TASKS_IN_FLIGHT = Gauge(
    "fedq_tasks_in_flight",
    "Tasks handed out and not yet answered, applied or expired.",
    ["job", "capability"],
)
TASKS_EXPIRED = Counter("fedq_tasks_expired", "In-flight tasks forgotten at their deadline.", ["job"])
TASKS_REDELIVERED = Counter(
    "fedq_tasks_redelivered", "Task redeliveries the workers reported in their heartbeats.", ["job"]
)
QUEUE_DEPTH = Gauge(
    "fedq_queue_depth",
    "Ready messages in a capability's task queue (passive declare).",
    ["job", "capability"],
)
QUEUE_CONSUMERS = Gauge(
    "fedq_queue_consumers", "Consumers of a capability's task queue.", ["job", "capability"]
)
TEST_ACCURACY = Gauge("fedq_test_accuracy", "Test accuracy of the newest evaluated version.", ["job"])
EVALUATED_VERSION = Gauge("fedq_evaluated_version", "The newest version evaluated.", ["job"])
# -- fedq run -------------------------------------------------------------------------------------
RUN_RESTARTS = Counter(
    "fedq_run_restarts", "Processes fedq run restarted (crashed, killed or chaos).", ["job", "process"]
)

METRICS = (
    UPDATES_ACCEPTED, UPDATES_REJECTED, VERSIONS_MADE, STALENESS, LATENCY, VERSION, BYTES_IN, BYTES_OUT,
    STARTS, TRAINING_SECONDS, WORKERS_LIVE, TASKS_ISSUED, TASKS_IN_FLIGHT, TASKS_EXPIRED, TASKS_REDELIVERED,
    QUEUE_DEPTH, QUEUE_CONSUMERS, TEST_ACCURACY, EVALUATED_VERSION, RUN_RESTARTS,
)  # fmt: skip


def exported_names() -> frozenset[str]:
    """Every series name fedq exports (``fedq_versions_total``, ``fedq_update_staleness_bucket``, ...):
    what a dashboard's queries may name."""
    names: set[str] = set()
    for family in (f for metric in METRICS for f in metric.describe()):
        base, kind = family.name, family.type
        if kind == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif kind == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
    return frozenset(names)


# -- the calls services make ----------------------------------------------------------------------
def applied(job: str, staleness: int, sent_at: float, now: float) -> None:
    """An update applied in a version stored at ``now`` (the aggregator's clock)."""
    UPDATES_ACCEPTED.labels(job).inc()
    STALENESS.labels(job).observe(staleness)
    latency = now - sent_at  # sent_at is the worker's clock and word: a nonsense figure is left out
    if math.isfinite(latency) and 0.0 <= latency <= MAX_LATENCY:
        LATENCY.labels(job).observe(latency)


def rejected(job: str, reason: str) -> None:
    UPDATES_REJECTED.labels(job, reason).inc()


def version_made(job: str, version: int, size: int) -> None:
    VERSIONS_MADE.labels(job).inc()
    VERSION.labels(job, "aggregator").set(version)
    BYTES_OUT.labels(job, "aggregator").inc(size)


def version(job: str, role: str, number: int) -> None:
    """The version ``role`` holds now (loaded, adopted)."""
    VERSION.labels(job, role).set(number)


def received(job: str, role: str, size: int) -> None:
    BYTES_IN.labels(job, role).inc(size)


def sent(job: str, role: str, size: int) -> None:
    BYTES_OUT.labels(job, role).inc(size)


def trained(job: str, seconds: float) -> None:
    TRAINING_SECONDS.labels(job).observe(seconds)


def task_issued(job: str, capability: str, size: int) -> None:
    TASKS_ISSUED.labels(job, capability).inc()
    BYTES_OUT.labels(job, "coordinator").inc(size)


def tasks_expired(job: str, count: int) -> None:
    TASKS_EXPIRED.labels(job).inc(count)


def evaluated(job: str, number: int, accuracy: float) -> None:
    TEST_ACCURACY.labels(job).set(accuracy)
    EVALUATED_VERSION.labels(job).set(number)


class FleetGauges:
    """The coordinator's view, set now and then (not per event): tasks in flight and live workers
    per capability, and the task redeliveries its workers report (a running total per worker
    that survives their restarts, turned into counter increments)."""

    def __init__(self, job: str, capabilities: Iterable[str]) -> None:
        self.job = job
        self.capabilities = tuple(capabilities)
        self._redelivered = 0

    def observe(self, in_flight: Mapping[str, int], live: Mapping[str, int], redelivered: int) -> None:
        for cap in self.capabilities:
            TASKS_IN_FLIGHT.labels(self.job, cap).set(in_flight.get(cap, 0))
            WORKERS_LIVE.labels(self.job, cap).set(live.get(cap, 0))
        if redelivered > self._redelivered:
            TASKS_REDELIVERED.labels(self.job).inc(redelivered - self._redelivered)
        self._redelivered = max(self._redelivered, redelivered)

    def queue(self, capability: str, depth: int, consumers: int) -> None:
        QUEUE_DEPTH.labels(self.job, capability).set(depth)
        QUEUE_CONSUMERS.labels(self.job, capability).set(consumers)


# -- the endpoint ---------------------------------------------------------------------------------
_served: dict[int, Any] = {}
_lock = threading.Lock()


def serving() -> bool:
    """Does this process serve its metrics (``serve`` was called with a port)?"""
    return bool(_served)


def serve(port: int, role: str, host: str = DEFAULT_HOST) -> None:
    """Count a start of ``role`` and, with ``port`` > 0, serve every metric of the process at
    ``http://host:port/metrics`` from a daemon thread (once per port, however often called)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port {port}: a port is 1-65535 (0: no metrics)")
    STARTS.labels(role).inc()
    if port == 0:
        return
    with _lock:
        if port in _served:
            return
        try:
            _served[port] = start_http_server(port, addr=host, registry=REGISTRY)
        except (OSError, OverflowError) as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
