"""Turn a run folder's records (metrics, ledger, coordinator state) into ``summary.json``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from fedq.cost import read_run, summary_totals
from shared.ledger import read_ledgers, read_lines
from shared.reasons import Fate

THRESHOLDS = ("0.80", "0.85")


def build_summary(
    run_dir: Path, coordinator_state: dict[str, Any], workers: int, wall_seconds: float
) -> dict[str, Any]:
    metrics = list(read_lines(run_dir / "metrics.jsonl"))
    ledger = [r for r in read_ledgers(run_dir) if not r.get("kind")]  # updates' records only
    accuracies = [m["accuracy"] for m in metrics if "accuracy" in m]
    to_acc: dict[str, float | None] = {}
    for key in THRESHOLDS:
        hit = next((m for m in metrics if m.get("accuracy", 0.0) >= float(key)), None)
        to_acc[key] = round(hit["t"], 3) if hit else None
    applied = [r for r in ledger if r.get("fate") == Fate.APPLIED]
    rejected = Counter(r.get("reason", "unknown") for r in ledger if r.get("fate") == Fate.REJECTED)
    t0 = coordinator_state.get("t0")
    stopped = coordinator_state.get("stopped")
    active = (stopped - t0) if t0 and stopped else None
    started = coordinator_state.get("started")
    staleness = [r["staleness"] for r in applied if "staleness" in r]
    return {
        "mode": coordinator_state.get("mode"),
        "workers": workers,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "seconds_to_accuracy": to_acc,
        "versions": max(
            max((m["version"] for m in metrics), default=0), coordinator_state.get("latest_version") or 0
        ),
        "updates_applied": len(applied),
        "updates_rejected": dict(rejected),
        "bytes_up": bytes_up(ledger),
        "bytes_down": coordinator_state.get("bytes_down", 0),
        "wall_seconds": round(wall_seconds, 3),
        # the coordinator's start to its first task: waiting for --min-workers workers to say hello
        "seconds_before_first_task": round(t0 - started, 3) if t0 and started else None,
        "stop_reason": coordinator_state.get("stop_reason"),
        "tasks_issued": coordinator_state.get("tasks_issued", 0),
        "mean_staleness": round(sum(staleness) / len(staleness), 3) if staleness else None,
        "updates_per_second": round(len(applied) / active, 3) if active else None,
        "job_id": coordinator_state.get("job_id"),
        # differential privacy: epsilon after the last version evaluated (None: the job ran without DP)
        "dp_epsilon": next((m["dp_epsilon"] for m in reversed(metrics) if "dp_epsilon" in m), None),
        # fedq cost's totals: CPU and wall seconds, samples, tasks, updates, bytes up and down, store bytes
        "cost": summary_totals(read_run(run_dir, coordinator_state)),
    }


def bytes_up(ledger: list[dict[str, Any]]) -> int:
    """The bytes of every message the aggregator's ledger records, and of each message the edges
    folded (once, however often: a refused partial's updates are folded again)."""
    folded = {r.get("digest"): int(r.get("bytes", 0)) for r in ledger if r.get("fate") == Fate.FOLDED}
    return sum(int(r.get("bytes", 0)) for r in ledger if r.get("fate") != Fate.FOLDED) + sum(folded.values())
