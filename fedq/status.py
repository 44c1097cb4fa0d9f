"""``fedq status``'s snapshot of one job: a pure function from the job folder's records (the
coordinator's state, metrics.jsonl, ledger.jsonl) and the broker's queue readings to one JSON-ready
dict. No I/O here: fedq/status_view.py reads the files and the broker, renders and loops.

The snapshot's keys are a contract for scripts (``fedq status --once --json``):

- ``job``, ``at`` (the reading's time), ``state`` (``waiting``, ``running``, ``stopped``, ``unknown``),
  ``stop_reason``;
- ``queues``: each task queue (per capability) and the updates queue, with ``messages`` (ready) and
  ``consumers``, ``null`` when the broker was not read or the queue does not exist;
- ``workers``: ``live`` (the ids the coordinator holds as live: heard within --worker-timeout and not
  gone; none once the job stopped), ``gone`` (heard from before, not live now), ``min_workers``, ``tasks`` (each worker's task
  counts over its restarts, from its hellos);
- ``version``: ``latest`` (the newest version the coordinator adopted, the store holds or the ledger
  applied updates in), ``evaluated`` and its ``accuracy``, ``best_accuracy``;
- ``updates``: ``applied``, ``rejected``, ``pending`` (one update message, one fate however often
  delivered, an applied record winning: ``shared.ledger.one_per_message``, as ``fedq cost`` and the
  dashboard count), ``per_second`` (applied within the last ``window`` seconds), ``window``;
- ``rejections``: rejected updates by reason;
- ``tasks``: ``issued`` and ``in_flight``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.ledger import one_per_message
from shared.reasons import Fate

RATE_WINDOW = 60.0  # seconds of ledger the update rate is taken over
STALE_STATE = 10.0  # a running coordinator rewrites its state every second: older than this, unknown


@dataclass(frozen=True)
class QueueReading:
    """A passive look at one queue: ``messages`` ready and ``consumers``; ``None`` when not read."""

    name: str
    capability: str | None  # None: the updates queue
    messages: int | None
    consumers: int | None


def snapshot(
    job: str,
    now: float,
    coordinator: Mapping[str, Any] | None,
    metrics: Iterable[Mapping[str, Any]],
    ledger: Iterable[Mapping[str, Any]],
    queues: Iterable[QueueReading],
    stored_version: int | None = None,
    window: float = RATE_WINDOW,
) -> dict[str, Any]:
    """One job's state as of ``now`` (see the module docstring for the keys)."""
    state = dict(coordinator or {})
    evaluations = [m for m in metrics if isinstance(m.get("version"), int)]
    messages = one_per_message(ledger)  # one message, one fate: as fedq cost and the dashboard count
    applied = [r for r in messages if r["fate"] == Fate.APPLIED]
    rejected = [r for r in messages if r["fate"] == Fate.REJECTED]
    pending = [r for r in messages if r["fate"] == Fate.PENDING]
    times = sorted(float(r["t"]) for r in applied if isinstance(r.get("t"), int | float))
    stopped = state.get("stop_reason") is not None
    live = [] if stopped else sorted(str(w) for w in state.get("workers_seen", []))
    counts = {str(w): dict(c) for w, c in sorted(state.get("workers", {}).items())}
    best = state.get("best_accuracy")
    last = evaluations[-1] if evaluations else None
    versions = [
        v
        for v in (
            state.get("latest_version"),
            stored_version,
            max(
                (int(r["version"]) for r in applied if isinstance(r.get("version"), int)),
                default=None,
            ),
            last["version"] if last else None,
        )
        if isinstance(v, int)
    ]
    return {
        "job": job,
        "at": now,
        "state": _state(state, now),
        "stop_reason": state.get("stop_reason"),
        "queues": [
            {"name": q.name, "capability": q.capability, "messages": q.messages, "consumers": q.consumers}
            for q in queues
        ],
        "workers": {
            "live": live,
            "gone": sorted(set(counts) - set(live)),
            "min_workers": state.get("min_workers"),
            "tasks": counts,
        },
        "version": {
            "latest": max(versions, default=None),
            "evaluated": last["version"] if last else None,
            "accuracy": last.get("accuracy") if last else None,
            "best_accuracy": best if best is not None else _best(evaluations),
        },
        "updates": {
            "applied": len(applied),
            "rejected": len(rejected),
            "pending": len(pending),
            "per_second": _rate(times, None if stopped else now, window),
            "window": window,
        },
        "rejections": dict(
            sorted(Counter(str(r.get("reason", "unknown")) for r in rejected).items())
        ),
        "tasks": {"issued": state.get("tasks_issued"), "in_flight": len(state.get("in_flight", {}))},
    }


def _state(state: Mapping[str, Any], now: float) -> str:
    if not state:
        return "unknown"
    if state.get("stop_reason") is not None:
        return "stopped"
    written = state.get("stopped")  # the time the state was written
    if isinstance(written, int | float) and now - written > STALE_STATE:
        return "unknown"  # no coordinator has written it for a while: killed, or on another machine
    return "running" if state.get("t0") is not None else "waiting"


def _best(evaluations: list[Mapping[str, Any]]) -> float | None:
    found = [float(m["accuracy"]) for m in evaluations if isinstance(m.get("accuracy"), int | float)]
    return max(found, default=None)


def _rate(times: list[float], now: float | None, window: float) -> float:
    """Applied updates per second over the ``window`` seconds up to ``now`` (a stopped job: up to
    its last update), over less when the job is younger than the window."""
    if not times:
        return 0.0
    end = times[-1] if now is None else now
    start = max(end - window, times[0])
    span = end - start
    inside = sum(1 for t in times if start <= t <= end)
    return inside / span if span > 0 else 0.0
