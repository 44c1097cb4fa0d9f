"""Fault tests: kill the aggregator mid-buffer, fail over to a standby, restart the coordinator,
run the chaos monkey. Each ends with the audit balance checked.

The jobs train the tiny app (a task takes milliseconds) and their workers sleep a fixed time after
each task (``--delay-profile``), so a job's pace does not depend on the load on the machine. A test
that must act at a given point holds the process it acts on still (SIGSTOP) and looks before it
kills, rather than racing the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from fedq.run import run_pids
from tests.support.jobs import (
    TINY_APP,
    assert_balanced,
    audit,
    cleanup,
    copy_run,
    enrol,
    fedq,
    finish,
    finished_run,
    log_events,
    records,
    start_run,
    stop_run,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.slow
__all__ = ["cleanup"]  # the fixture, re-exported for these tests


def pids(out: Path) -> dict[str, int]:
    return run_pids(out)


def applied(out: Path) -> list[dict[str, Any]]:
    path = out / "ledger.jsonl"
    return [r for r in records(path) if r["fate"] == "applied"] if path.exists() else []


def test_aggregator_killed_with_half_full_buffer(tmp_path: Path, names: Names, cleanup: None) -> None:
    """The aggregator is killed while it holds a part-filled buffer (updates it has not acked: they
    are acked only once a stored version holds them). ``fedq run`` restarts it; the held updates
    come back redelivered and are applied once."""
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "2",
        "--delay-profile",
        "0.3*2",
        "--buffer",
        "4",
        "--target-accuracy",
        "0",
        "--max-updates",
        "40",
        "--max-seconds",
        "200",
        "--log-level",
        "debug",
    )
    log = out / "logs" / "aggregator.log"
    try:
        wait_for(lambda: len(applied(out)) >= 8, 150, "two versions", proc)
        aggregator = pids(out)["aggregator"]
        # Hold it still and read its last buffer count: an update_buffered event is logged before a
        # full buffer is folded, so 1-3 as the last count means that many updates held, unacked.
        deadline = time.monotonic() + 60
        while True:
            os.kill(aggregator, signal.SIGSTOP)
            buffered = log_events(log, "update_buffered")[-1]["buffered"]
            if 0 < buffered < 4:
                break
            os.kill(aggregator, signal.SIGCONT)
            assert time.monotonic() < deadline, "never caught the aggregator with a part-filled buffer"
            time.sleep(0.1)
        os.kill(aggregator, signal.SIGKILL)
        finish(proc)
    finally:
        stop_run(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates", summary
    assert summary["restarts"].get("aggregator") == 1
    assert len(log_events(log, "resumed")) == 2  # the first process and its replacement
    # what the killed aggregator held unacked came back and was applied once
    assert sum(r["redelivered"] for r in applied(out)) >= buffered
    assert summary["audit"]["ok"]
    assert_balanced(out)


def test_standby_aggregator_takes_over(tmp_path: Path, names: Names, cleanup: None) -> None:
    """A second aggregator attaches while the first is alive: while updates flow, the first goes on
    making every version and the standby waits (single active consumer); when the first is killed,
    the standby makes the next versions and the job ends balanced."""
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "2",
        "--delay-profile",
        "0.2*2",
        "--buffer",
        "2",
        "--target-accuracy",
        "0",
        "--max-updates",
        "40",
        "--max-seconds",
        "200",
    )
    log = out / "logs" / "aggregator.log"
    standby: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: len(applied(out)) >= 4, 150, "the job to get going", proc)
        coordinator, primary = pids(out)["coordinator"], pids(out)["aggregator"]
        # Hold the coordinator still while the standby starts: no new task, so the job cannot end
        # before the takeover; the first aggregator runs on.
        os.kill(coordinator, signal.SIGSTOP)
        try:
            env = {
                **worker_env(names, out),
                "FEDQ_TRUSTED_KEYS": str(out / "keys" / "trusted"),
                "FEDQ_OUT": str(out),
                "FEDQ_BUFFER": "2",
            }
            standby_key = enrol(out / "keys", "standby")  # the coordinator trusts only known aggregators
            standby_log = out / "logs" / "standby.log"
            with standby_log.open("wb") as fh:
                standby = subprocess.Popen(
                    fedq("aggregator", "--key-file", str(standby_key)),
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            wait_for(lambda: bool(log_events(standby_log, "consuming")), 90, "the standby to attach", proc)
            made = len(log_events(log, "version"))
        finally:
            os.kill(coordinator, signal.SIGCONT)
        # updates flow again, to the first aggregator only: two more versions (four updates), none
        # of them made by the standby
        wait_for(lambda: len(log_events(log, "version")) >= made + 2, 60, "two more versions", proc)
        assert not log_events(standby_log, "version")  # single active consumer: it waits
        os.kill(primary, signal.SIGKILL)
        wait_for(lambda: bool(log_events(standby_log, "version")), 60, "the standby to take over", proc)
        finish(proc)
    finally:
        stop_run(proc)
        if standby is not None:
            standby.send_signal(signal.SIGTERM)
            standby.wait(20)
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "max_updates"
    assert_balanced(out, audit(out))  # again, now that the standby (outside the run) has stopped too


def test_coordinator_restart_resumes_the_job(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    # about six updates a second: the job has some 30 left, five seconds, when the coordinator dies
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "2",
        "--delay-profile",
        "0.3*2",
        "--buffer",
        "3",
        "--target-accuracy",
        "0",
        "--max-updates",
        "36",
        "--max-seconds",
        "200",
    )
    try:
        wait_for(lambda: len(applied(out)) >= 6, 150, "the job to get going", proc)
        issued_before = json.loads((out / "coordinator.json").read_text())["tasks_issued"]
        os.kill(pids(out)["coordinator"], signal.SIGKILL)
        finish(proc)
    finally:
        stop_run(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates", summary
    assert summary["restarts"].get("coordinator") == 1
    log = out / "logs" / "coordinator.log"
    assert len(log_events(log, "created_version_0")) == 1  # not started over
    assert len(log_events(log, "resumed_job")) == 1
    assert summary["tasks_issued"] >= issued_before
    versions = [m["version"] for m in records(out / "metrics.jsonl")]
    assert len(versions) == len(set(versions))  # each version evaluated once
    assert_balanced(out)


def test_chaos_run_balances(tmp_path: Path, names: Names, cleanup: None) -> None:
    """``--chaos 2``: a worker killed every 2 s (and restarted later), the aggregator killed once at
    5 s. Three workers that sleep 1 s a task make at most 3 updates a second: some of the 20 (at least
    4: the kill comes within 5.5 s of the first task) are still to come when the aggregator is
    killed, and workers die all along the job."""
    out = tmp_path / "run"
    finish(
        start_run(
            out,
            names,
            *TINY_APP,
            "--workers",
            "3",
            "--delay-profile",
            "1*3",
            "--buffer",
            "3",
            "--chaos",
            "2",
            "--target-accuracy",
            "0",
            "--max-updates",
            "20",
            "--max-seconds",
            "240",
        ),
        timeout=300,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates", summary
    assert summary["chaos"]["workers_killed"] >= 2 and summary["chaos"]["aggregator_killed"] == 1
    assert summary["audit"]["ok"] and summary["audit"]["lost"] == 0
    assert_balanced(out)


def test_audit_detects_an_update_applied_twice(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, amqp_url: str, tmp_path: Path
) -> None:
    """On a copy of the session's finished run: the audit balances; an update id copied into a second
    version is named as applied twice, and a version whose parent is wrong breaks the chain."""
    out = copy_run(finished_run(request, tmp_path_factory, amqp_url)[0], tmp_path / "run")
    assert_balanced(out, audit(out))
    manifests = sorted((out / "store").rglob("v*.json"))
    v1, v2 = (json.loads(p.read_text()) for p in manifests[1:3])
    v2["update_ids"].append(v1["update_ids"][0])
    manifests[2].write_text(json.dumps(v2))
    balance = audit(out)
    assert not balance["ok"] and list(balance["applied_twice"]) == [v1["update_ids"][0]]
    v2["parent"] = 0
    manifests[2].write_text(json.dumps(v2))
    assert not audit(out)["chain_ok"]
