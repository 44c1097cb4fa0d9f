"""``fedq status``: the snapshot (fedq/status.py, pure) from synthetic records, its JSON shape, and the
command on a job folder with no broker to reach. No broker: the live check is in test_prometheus.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedq import cost
from fedq.status import RATE_WINDOW, QueueReading, snapshot
from fedq.status_view import Tail, render
from tests.support.jobs import ROOT, cli

NOW = 1_000_000.0
KEYS = {"job", "at", "state", "stop_reason", "queues", "workers", "version", "updates", "rejections", "tasks"}
QUEUES = [
    QueueReading("fedq.job.j.tasks.cpu", "cpu", 3, 2),
    QueueReading("fedq.job.j.tasks.gpu", "gpu", None, None),  # no such queue
    QueueReading("fedq.job.j.updates", None, 0, 1),
]


def coordinator(**changes: Any) -> dict[str, Any]:
    state = {
        "job_id": "j",
        "min_workers": 2,
        "t0": NOW - 100,
        "stopped": NOW - 0.5,  # written half a second ago
        "stop_reason": None,
        "tasks_issued": 12,
        "latest_version": 4,
        "best_accuracy": 0.75,
        "workers_seen": ["w01", "w00"],
        "workers": {
            "w00": {"received": 5, "completed": 4, "expired": 0, "redelivered": 1},
            "w01": {"received": 4, "completed": 4, "expired": 0, "redelivered": 0},
            "w02": {"received": 2, "completed": 1, "expired": 1, "redelivered": 0},
        },
        "in_flight": {"t9": {"capability": "cpu", "deadline": NOW + 30, "version": 4}},
    }
    return {**state, **changes}


def applied(n: int, t: float, version: int) -> dict[str, Any]:
    return {
        "fate": "applied",
        "digest": f"d{n}",
        "task_id": f"t{n}",
        "t": t,
        "version": version,
        "worker_id": "w00",
    }


METRICS = [
    {"version": 0, "accuracy": 0.5},
    {"version": 2, "accuracy": 0.75},
    {"version": 3, "accuracy": 0.7},
]
LEDGER = [
    *(applied(n, NOW - 90 + n, 1 + n // 3) for n in range(6)),  # 6 updates long ago, in versions 1, 2
    *(applied(n, NOW - 30 + n, 3 + (n - 6) // 3) for n in range(6, 12)),  # 6 in the last minute, up to v4
    applied(11, NOW - 19, 4),  # the same message delivered again: counts once
    {
        "fate": "rejected",
        "digest": "d11",
        "task_id": "t11",
        "reason": "duplicate",
        "t": NOW - 18,
    },  # and applied
    {"fate": "rejected", "digest": "x1", "task_id": "x1", "reason": "stale", "t": NOW - 10},
    {"fate": "rejected", "digest": "x1", "task_id": "x1", "reason": "stale", "t": NOW - 9},  # redelivered
    {"fate": "rejected", "digest": "x2", "task_id": "x2", "reason": "bad_signature", "t": NOW - 8},
    {"fate": "pending", "digest": "p1", "task_id": "p1", "t": NOW - 1},
    {"fate": "rollback", "version": 5, "t": NOW},  # an operator's record, not an update
]


def test_a_running_job() -> None:
    snap = snapshot("j", NOW, coordinator(), METRICS, LEDGER, QUEUES, stored_version=4)
    assert set(snap) == KEYS
    assert (snap["job"], snap["at"], snap["state"], snap["stop_reason"]) == ("j", NOW, "running", None)
    assert snap["queues"] == [
        {"name": "fedq.job.j.tasks.cpu", "capability": "cpu", "messages": 3, "consumers": 2},
        {"name": "fedq.job.j.tasks.gpu", "capability": "gpu", "messages": None, "consumers": None},
        {"name": "fedq.job.j.updates", "capability": None, "messages": 0, "consumers": 1},
    ]
    assert snap["workers"]["live"] == ["w00", "w01"]
    assert snap["workers"]["gone"] == ["w02"]
    assert snap["workers"]["min_workers"] == 2
    assert snap["workers"]["tasks"]["w02"] == {"received": 2, "completed": 1, "expired": 1, "redelivered": 0}
    assert snap["version"] == {"latest": 4, "evaluated": 3, "accuracy": 0.7, "best_accuracy": 0.75}
    assert snap["updates"] == {
        "applied": 12,
        "rejected": 2,
        "pending": 1,
        "per_second": 6 / RATE_WINDOW,
        "window": RATE_WINDOW,
    }
    assert snap["rejections"] == {"bad_signature": 1, "stale": 1}
    assert snap["tasks"] == {"issued": 12, "in_flight": 1}
    assert json.loads(json.dumps(snap)) == snap  # plain JSON, nothing lost


def test_the_newest_version_is_the_newest_any_source_knows() -> None:
    behind = coordinator(latest_version=2)
    assert snapshot("j", NOW, behind, METRICS, LEDGER, [])["version"]["latest"] == 4  # the ledger's
    assert snapshot("j", NOW, behind, METRICS, LEDGER, [], stored_version=6)["version"]["latest"] == 6
    assert snapshot("j", NOW, None, [], [], [])["version"]["latest"] is None


def test_a_stopped_job_has_no_live_workers_and_its_rate_ends_at_its_last_update() -> None:
    done = coordinator(stop_reason="max_versions", stopped=NOW - 3600)
    ledger = [applied(n, NOW - 7200 + n, 1) for n in range(10)]  # 10 updates in 9 s, an hour ago
    snap = snapshot("j", NOW, done, METRICS, ledger, [])
    assert (snap["state"], snap["stop_reason"]) == ("stopped", "max_versions")
    assert snap["workers"]["live"] == [] and snap["workers"]["gone"] == ["w00", "w01", "w02"]
    assert snap["updates"]["per_second"] == 10 / 9


def test_before_the_first_task_and_without_a_coordinator() -> None:
    waiting = coordinator(t0=None, workers_seen=["w00"], workers={})
    assert snapshot("j", NOW, waiting, [], [], [])["state"] == "waiting"
    silent = coordinator(stopped=NOW - 60)  # no coordinator has rewritten it for a minute
    assert snapshot("j", NOW, silent, [], [], [])["state"] == "unknown"
    empty = snapshot("j", NOW, None, [], [], [])
    assert set(empty) == KEYS and empty["state"] == "unknown"
    assert empty["workers"] == {"live": [], "gone": [], "min_workers": None, "tasks": {}}
    assert empty["updates"]["per_second"] == 0.0 and empty["rejections"] == {}
    assert empty["version"] == {"latest": None, "evaluated": None, "accuracy": None, "best_accuracy": None}
    render(empty)  # a view with nothing to show renders too


def test_a_torn_last_line_waits_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    tail = Tail(path)
    assert tail.read() == []
    path.write_text('{"a": 1}\n{"b":')
    assert tail.read() == [{"a": 1}]
    with path.open("a") as fh:
        fh.write(' 2}\nnot json\n{"c": 3}\n')
    assert tail.read() == [{"a": 1}, {"b": 2}, {"c": 3}]


def test_the_command_on_a_job_folder_without_a_broker(tmp_path: Path) -> None:
    (tmp_path / "coordinator.json").write_text(json.dumps(coordinator(stopped=NOW + 10**9)))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LEDGER))
    where = ("--out", tmp_path, "--store", "none", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
    ran = cli("status", "j", *where, "--once", "--json")
    assert ran.returncode == 0, ran.stderr
    snap = json.loads(ran.stdout)
    assert set(snap) == KEYS | {"broker_error"}
    assert "cannot reach RabbitMQ" in snap["broker_error"]
    assert [q["name"] for q in snap["queues"]] == ["fedq.job.j.tasks.cpu", "fedq.job.j.updates"]
    assert snap["workers"]["live"] == ["w00", "w01"] and snap["version"]["latest"] == 4
    text = cli("status", "j", *where, "--once")
    assert text.returncode == 0 and "fedq.job.j.tasks.cpu" in text.stdout and "stale" in text.stdout
    refused = cli("status", "j", *where, "--json")
    assert refused.returncode == 2 and "--once" in refused.stderr


def test_the_snapshot_is_pure() -> None:
    probe = "import sys, fedq.status; print(sorted({m.partition('.')[0] for m in sys.modules}))"
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.replace("'", '"')
    )
    assert not {"asyncio", "aio_pika", "aiormq", "aioboto3", "structlog", "rich", "torch"} & set(loaded)


def test_updates_count_as_fedq_cost_counts_them() -> None:
    ledger = [
        {"fate": "pending", "digest": "a", "task_id": "t1", "worker_id": "w1", "bytes": 40},  # a clean stop
        {"fate": "applied", "digest": "a", "task_id": "t1", "worker_id": "w1", "version": 1, "t": NOW - 5},
        {"fate": "rejected", "digest": "a", "task_id": "t1", "worker_id": "w1", "reason": "duplicate"},
        {"fate": "rejected", "digest": "b", "task_id": "t2", "worker_id": "w2", "reason": "stale"},
        {"fate": "rejected", "digest": "b", "task_id": "t2", "worker_id": "w2", "reason": "stale"},  # parked
        {"fate": "pending", "digest": "c", "task_id": "t3", "worker_id": "w2"},
        # an old ledger's records, without digests: each kept as it is
        {"fate": "applied", "task_id": "t9", "worker_id": "w1", "version": 1, "t": NOW - 4},
        {"fate": "rejected", "task_id": "t9", "worker_id": "w1", "reason": "duplicate"},
    ]
    updates = snapshot("j", NOW, coordinator(), [], ledger, [])["updates"]
    total = cost.totals(cost.Records(ledger=tuple(ledger)))
    assert (updates["applied"], updates["rejected"], updates["pending"]) == (2, 2, 1)
    assert (total.updates_applied, total.updates_rejected) == (updates["applied"], updates["rejected"])
