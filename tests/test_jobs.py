"""Whole jobs through the real broker: each service its own process.

These are the slowest tests (tens of seconds each): they run ``fedq run`` as a
user would and read the run folder it leaves behind. The jobs that must learn train
MNIST-1D for real; the others train the tiny app, their pace set by the workers'
``--delay-profile`` rather than by the load on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from broker_config.names import Names
from fedq.run import run_pids
from tests.support.jobs import (
    TINY_APP,
    cleanup,
    enrol,
    fedq,
    finish,
    log_events,
    records,
    start_run,
    stop_run,
    stop_workers,
    wait_for,
    worker_env,
)

__all__ = ["cleanup"]  # the fixture, used by these tests

pytestmark = pytest.mark.slow


def check_no_double_counting(out: Path) -> Counter[str]:
    """Every applied task id once in the ledger and once across all version manifests."""
    ledger = records(out / "ledger.jsonl")
    applied = Counter(r["task_id"] for r in ledger if r["fate"] == "applied")
    assert applied and max(applied.values()) == 1, applied.most_common(3)
    in_manifests: Counter[str] = Counter()
    for manifest in sorted((out / "store").rglob("v*.json")):
        in_manifests.update(json.loads(manifest.read_text())["update_ids"])
    assert in_manifests == applied
    return applied


def test_async_job_learns(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    output = finish(
        start_run(
            out, names, "--workers", "3", "--target-accuracy", "0.7", "--max-seconds", "150", "--buffer", "3"
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert f"run folder {out}" in output
    for key in (
        "mode",
        "workers",
        "final_accuracy",
        "best_accuracy",
        "seconds_to_accuracy",
        "versions",
        "updates_applied",
        "updates_rejected",
        "bytes_up",
        "bytes_down",
        "wall_seconds",
        "stop_reason",
    ):
        assert key in summary, key
    assert summary["mode"] == "async" and summary["workers"] == 3
    assert summary["stop_reason"] == "target_accuracy", summary
    assert summary["final_accuracy"] >= 0.7  # chance is 0.1
    assert set(summary["seconds_to_accuracy"]) == {"0.80", "0.85"}
    assert summary["updates_rejected"] == {}
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    applied = check_no_double_counting(out)
    assert summary["updates_applied"] == len(applied)
    metrics = records(out / "metrics.jsonl")
    assert [m["version"] for m in metrics] == sorted(m["version"] for m in metrics)
    assert metrics[0]["version"] == 0 and metrics[0]["accuracy"] < 0.3
    for name, pid in run_pids(out).items():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), name


def test_sync_job_learns(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    finish(
        # --inline-limit 0: tasks carry a store reference and workers fetch the model from the store
        start_run(
            out,
            names,
            "--mode",
            "sync",
            "--workers",
            "3",
            "--target-accuracy",
            "0.7",
            "--max-seconds",
            "150",
            "--inline-limit",
            "0",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sync"
    assert summary["stop_reason"] == "target_accuracy", summary
    assert summary["final_accuracy"] >= 0.7
    check_no_double_counting(out)
    ledger = records(out / "ledger.jsonl")
    assert all(r["staleness"] == 0 for r in ledger if r["fate"] == "applied")
    # by reference: a task is a few hundred bytes, far below the ~34 kB model
    assert summary["bytes_down"] / summary["tasks_issued"] < 2000


def test_killed_worker_does_not_stop_the_job(tmp_path: Path, names: Names, cleanup: None) -> None:
    """A worker killed in the middle of a task: the job goes on, and the task it held is redelivered
    and done by another worker, once."""
    out = tmp_path / "run"
    # The tiny app: w01 sleeps 3 s after each task, so it is almost always mid-task when killed;
    # the others, 0.5 s: some 35 of the 50 updates are still to come when it is killed.
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "3",
        "--delay-profile",
        "0.5*1,3*1,0.5*1",
        "--target-accuracy",
        "0",
        "--max-updates",
        "50",
        "--max-seconds",
        "200",
        "--buffer",
        "3",
    )
    log = out / "logs" / "w01.log"
    try:
        wait_for(
            lambda: len(log_events(log, "update_sent")) >= 1 and (out / "processes.json").exists(),
            120,
            "w01",
            proc,
        )
        wait_for(
            lambda: len(log_events(log, "task_started")) > len(log_events(log, "update_sent")),
            30,
            "a task",
            proc,
        )
        in_hand = log_events(log, "task_started")[-1]["task"]
        os.kill(run_pids(out)["w01"], signal.SIGKILL)
        finish(proc)
    finally:
        stop_run(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates", summary
    applied = check_no_double_counting(out)
    ledger = {r["task_id"]: r for r in records(out / "ledger.jsonl") if r["fate"] == "applied"}
    # The killed worker's task was redelivered and done by someone else, once.
    assert in_hand in ledger and ledger[in_hand]["worker_id"] != "w01"
    assert applied[in_hand] == 1


def test_workers_started_by_hand_join_mid_job(tmp_path: Path, names: Names, cleanup: None) -> None:
    """Workers started outside the run, their keys enrolled, join it while it runs and take part: a
    single worker (``late``), and one process hosting three replicas (``fedq worker --replicas 3``),
    each with its own id, key and share of the data."""
    out = tmp_path / "run"
    # The tiny app: the run's own worker sleeps 2 s after each task, so alone it would need 80 s for
    # the 40 updates; the workers started by hand (0.5 s per task) have all that time to start, then
    # do most of them.
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "1",
        "--delay-profile",
        "2*1",
        "--target-accuracy",
        "0",
        "--max-updates",
        "40",
        "--max-seconds",
        "200",
        "--buffer",
        "2",
    )
    replicas = [f"fleet-r{j}" for j in range(3)]
    started: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: len(records(out / "ledger.jsonl")) >= 2, 120, "the job's first version", proc)
        # the newcomers' public keys go to the trusted directory; replicas keep their private keys
        # in the keys directory, under their own ids
        late_key = enrol(out / "keys", "worker-late")
        for wid in replicas:
            enrol(out / "keys", f"worker-{wid}")
        for name, args in (
            # 0.5 s per task: whichever process joins first cannot do the remaining updates alone
            # before the other has started (a CI run saw the fleet finish the job as late said hello)
            ("late", ("--worker-id", "late", "--partition", "1/2", "--key-file", str(late_key), "--delay", "0.5")),
            ("fleet", ("--worker-id", "fleet", "--replicas", "3", "--partition", "1/4", "--delay", "0.5")),
        ):
            with (tmp_path / f"{name}.log").open("w") as log:
                started.append(
                    subprocess.Popen(
                        fedq("worker", *args),
                        env=worker_env(names, out),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        finish(proc)
    finally:
        stop_run(proc)
        lingering = stop_workers(started)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates" and summary["audit"]["ok"], summary
    check_no_double_counting(out)
    joined = {e["worker"] for e in log_events(out / "logs" / "coordinator.log", "worker_joined")}
    assert {"late", *replicas} <= joined, joined
    applied_by = Counter(r["worker_id"] for r in records(out / "ledger.jsonl") if r["fate"] == "applied")
    assert all(applied_by[w] >= 1 for w in ("late", *replicas)), applied_by
    partitions = {e["worker"]: e["partition"] for e in log_events(tmp_path / "fleet.log", "started")}
    assert partitions == {"fleet-r0": "1/4", "fleet-r1": "2/4", "fleet-r2": "3/4"}
    assert not lingering, f"still running 20 s after SIGTERM (killed): {lingering}"


def test_two_jobs_on_one_broker_each_end_on_their_own_terms(tmp_path: Path, names: Names, cleanup: None) -> None:
    """Two ``fedq run`` jobs at once in one namespace, fleets of three and two workers: neither takes
    the other's tasks, updates or hellos, so each ends on its own terms with its own fleet and each
    audit balances, with no update of the other job in its ledger and no rejection at all. The tiny
    app: the point is where messages go, not learning (each task held 0.5 s: the jobs overlap)."""
    outs = [tmp_path / "job-a", tmp_path / "job-b"]
    fleets = (3, 2)
    flags = (*TINY_APP, "--target-accuracy", "0", "--max-updates", "40", "--max-seconds", "200", "--buffer", "3")
    runs = [
        start_run(out, names, *flags, "--workers", str(n), "--delay-profile", f"0.5*{n}")
        for out, n in zip(outs, fleets, strict=True)
    ]
    outputs = [finish(run, timeout=300) for run in runs]
    jobs, spans = [], []
    for out, output, n in zip(outs, outputs, fleets, strict=True):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == "max_updates", (summary, output[-2000:])
        assert summary["updates_rejected"] == {}, summary
        audit = json.loads((out / "audit.json").read_text())
        assert audit["ok"] and audit["lost"] == 0 and audit["applied"] == summary["updates_applied"], audit
        job = json.loads((out / "config.json").read_text())["settings"]["job"]
        jobs.append(job)
        state = json.loads((out / "coordinator.json").read_text())
        assert sorted(state["workers"]) == [f"w{i:02d}" for i in range(n)], state["workers"]  # its own hellos
        spans.append((state["t0"], state["stopped"]))
        applied = check_no_double_counting(out)
        tasks = {r["task_id"] for r in records(out / "ledger.jsonl")}
        assert set(applied) <= tasks
    assert max(t0 for t0, _ in spans) < min(stopped for _, stopped in spans), spans  # both ran at once
    assert jobs[0] != jobs[1]
    ledgers = [{r["task_id"] for r in records(out / "ledger.jsonl")} for out in outs]
    assert not ledgers[0] & ledgers[1]  # no update of one job reached the other's aggregator
