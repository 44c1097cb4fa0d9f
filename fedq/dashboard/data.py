"""What the dashboard and the report show, as one JSON document built from a run folder's records.

Pure: ``snapshot`` turns records already read (metrics.jsonl, ledger.jsonl, coordinator.json,
processes.json with each pid's liveness, a look at the queues) into the document the page draws.
Reading the folder and looking at the broker are thin layers elsewhere (``source.py``, ``live.py``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedq import cost
from shared.ledger import one_per_message
from shared.reasons import Fate

SIZE_BINS = 12  # bars of the update-size histogram
QUIET_AFTER = 15.0  # seconds without a sign of life after which a live service is shown as quiet


@dataclass(frozen=True)
class QueueLook:
    """One queue as a passive declare saw it (``messages`` ready, ``consumers``)."""

    queue: str
    role: str  # what the queue is for: "tasks cpu", "updates", "coordinator", "dead letters"
    messages: int | None  # None: the queue does not exist (or could not be looked at)
    consumers: int | None


@dataclass(frozen=True)
class Queues:
    """The broker's side of a live job: what was looked at, how, and when."""

    source: str  # how the figures were obtained, shown on the page
    looks: tuple[QueueLook, ...] = ()
    at: float | None = None  # when; None: not looked at (a finished run, no broker)
    error: str = ""


@dataclass(frozen=True)
class Process:
    """A process ``fedq run`` started (processes.json), and whether its pid is alive now."""

    name: str
    pid: int
    alive: bool
    metrics_port: int = 0


@dataclass(frozen=True)
class RunRecords:
    """A run folder's records, as read at ``now``; ``live``: some process of the run is alive."""

    run: str
    job: str
    metrics: tuple[Mapping[str, Any], ...] = ()
    ledger: tuple[Mapping[str, Any], ...] = ()
    coordinator: Mapping[str, Any] = field(default_factory=dict)
    processes: tuple[Process, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)
    cost: cost.Records | None = None
    queues: Queues = Queues("not looked at: a finished run")
    ledger_mtime: float | None = None  # the aggregator's last write
    live: bool = False


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def accuracy_series(metrics: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per evaluated version, in version order (a re-evaluated version: its last row)."""
    by_version: dict[int, dict[str, Any]] = {}
    for row in metrics:
        version, accuracy = row.get("version"), _finite(row.get("accuracy"))
        if not isinstance(version, int) or accuracy is None:
            continue
        by_version[version] = {
            "version": version,
            "accuracy": accuracy,
            "t": _finite(row.get("t")),
            "updates_total": row.get("updates_total"),
            "mean_staleness": _finite(row.get("mean_staleness")),
            "dp_epsilon": _finite(row.get("dp_epsilon")),
        }
    return [by_version[v] for v in sorted(by_version)]


def _updates(ledger: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ledger's update records, one per message, an applied record winning (as fedq cost and fedq
    status count them)."""
    return one_per_message(ledger)


def json_safe(value: Any) -> Any:
    """``value`` with every number that is not finite (NaN, an overflowed sum) turned into ``None``,
    so that it encodes as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def size_histogram(sizes: Sequence[int], bins: int = SIZE_BINS) -> list[dict[str, Any]]:
    """Equal-width bins over [min, max] of the update sizes in bytes (one bin when all are equal)."""
    if not sizes:
        return []
    lo, hi = min(sizes), max(sizes)
    if lo == hi:
        return [{"lo": lo, "hi": hi, "count": len(sizes)}]
    width = (hi - lo) / bins
    counts = [0] * bins
    for s in sizes:
        counts[min(bins - 1, int((s - lo) / width))] += 1
    return [
        {"lo": round(lo + i * width), "hi": round(lo + (i + 1) * width), "count": c}
        for i, c in enumerate(counts)
    ]


def _worker_status(records: RunRecords) -> dict[str, str]:
    """Each worker ever seen: live (its heartbeats keep it in the coordinator's registry, and its
    process, when fedq run started it, is alive) or gone."""
    seen: set[str] = set(records.coordinator.get("workers") or {})
    seen |= {str(r["worker_id"]) for r in _updates(records.ledger) if r.get("worker_id")}
    registry = set(records.coordinator.get("workers_seen") or [])
    seen |= registry
    procs = {p.name: p for p in records.processes}
    status = {}
    for w in sorted(seen):
        proc = procs.get(w)
        alive = records.live and w in registry and (proc is None or proc.alive)
        status[w] = "live" if alive else "gone"
    return status


def participation(records: RunRecords) -> list[dict[str, Any]]:
    """Per worker: updates applied, rejected and pending, samples, its org and its status."""
    status = _worker_status(records)
    orgs = cost.worker_orgs(records.cost) if records.cost else {}
    counts: dict[str, Counter[str]] = {w: Counter() for w in status}
    samples: Counter[str] = Counter()
    for r in _updates(records.ledger):
        w = str(r.get("worker_id") or cost.UNKNOWN_WORKER)
        counts.setdefault(w, Counter())[str(r["fate"])] += 1
        if r["fate"] == Fate.APPLIED:
            samples[w] += int(_finite(r.get("num_samples")) or 0)
    tasks = records.coordinator.get("workers") or {}
    return [
        {
            "worker": w,
            "org": orgs.get(w, ""),
            "status": status.get(w, "gone"),
            "applied": c[Fate.APPLIED],
            "rejected": c[Fate.REJECTED],
            "pending": c[Fate.PENDING],
            "samples": samples[w],
            "tasks_received": int((tasks.get(w) or {}).get("received", 0)),
        }
        for w, c in sorted(counts.items())
    ]


def services(records: RunRecords, now: float) -> list[dict[str, Any]]:
    """The health of each process: its pid (processes.json) and its last sign of life (the
    coordinator's state file, written every second or so; the aggregator's ledger; a worker's
    heartbeats, as the coordinator's registry holds them)."""
    coordinator_at = _finite(records.coordinator.get("stopped"))
    registry = set(records.coordinator.get("workers_seen") or [])
    out = []
    for p in records.processes:
        if p.name == "coordinator":
            sign, at = "state written", coordinator_at
        elif p.name == "aggregator":
            sign, at = "ledger written", records.ledger_mtime
        else:
            sign, at = ("heartbeats" if p.name in registry else "no heartbeats"), None
        if not records.live:
            health = "finished"
        elif not p.alive:
            health = "down"
        elif at is not None and now - at > QUIET_AFTER:
            health = "quiet"
        else:
            health = "up"
        out.append(
            {
                "name": p.name,
                "pid": p.pid,
                "alive": p.alive,
                "health": health,
                "sign": sign,
                "age": None if at is None else round(max(0.0, now - at), 1),
                "metrics_port": p.metrics_port,
            }
        )
    return out


def cost_table(records: cost.Records | None) -> dict[str, Any]:
    """``fedq cost``'s table by worker: its columns and rows (exact numbers)."""
    if records is None:
        return {"keys": [], "columns": [], "rows": []}
    keys = ["worker", "org", *(name for name, _ in cost.COLUMNS)]
    columns = ["worker", "org", *(title for _, title in cost.COLUMNS)]
    rows = []
    for row in cost.rows(records, cost.By.WORKER):
        u = row.usage.to_dict()
        rows.append([row.key, row.org, *(u[name] for name, _ in cost.COLUMNS)])
    return {"keys": keys, "columns": columns, "rows": rows, "store_known": records.versions_known}


def snapshot(records: RunRecords, now: float) -> dict[str, Any]:
    """The document the page draws: every view of the dashboard, from the records."""
    updates = _updates(records.ledger)
    applied = [r for r in updates if r["fate"] == Fate.APPLIED]
    rejected = Counter(str(r.get("reason") or "unknown") for r in updates if r["fate"] == Fate.REJECTED)
    staleness = Counter(int(s) for r in applied if (s := _finite(r.get("staleness"))) is not None)
    sizes = [int(b) for r in updates if (b := _finite(r.get("bytes"))) is not None]
    series = accuracy_series(records.metrics)
    workers = participation(records)
    state = records.coordinator
    document = {
        "run": records.run,
        "job": records.job,
        "live": records.live,
        "now": now,
        "headline": {
            "version": series[-1]["version"] if series else state.get("latest_version"),
            "accuracy": series[-1]["accuracy"] if series else None,
            "best_accuracy": max((p["accuracy"] for p in series), default=None),
            "updates_applied": len(applied),
            "updates_rejected": sum(rejected.values()),
            "workers_live": sum(w["status"] == "live" for w in workers),
            "workers_gone": sum(w["status"] == "gone" for w in workers),
            "stop_reason": state.get("stop_reason") or records.summary.get("stop_reason"),
            "mode": state.get("mode"),
        },
        "accuracy": series,
        "participation": workers,
        "update_sizes": {
            "bins": size_histogram(sizes),
            "count": len(sizes),
            "mean": round(sum(sizes) / len(sizes), 1) if sizes else None,
        },
        "staleness": [{"staleness": s, "count": c} for s, c in sorted(staleness.items())],
        "rejections": [
            {"reason": r, "count": c} for r, c in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "queues": {
            "source": records.queues.source,
            "at": records.queues.at,
            "error": records.queues.error,
            "rows": [
                {"queue": q.queue, "role": q.role, "messages": q.messages, "consumers": q.consumers}
                for q in records.queues.looks
            ],
        },
        "services": services(records, now),
        "health_source": "processes.json (each pid checked now), coordinator.json (written by the coordinator "
        "each second; its worker registry follows their heartbeats), ledger.jsonl's last write",
        "cost": cost_table(records.cost),
    }
    safe: dict[str, Any] = json_safe(document)  # the records are the processes' word: no NaN reaches JSON
    return safe
