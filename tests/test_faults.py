"""Fault tests: kill the aggregator mid-buffer, fail over to a standby, restart the coordinator,
run the chaos monkey. Each ends with the audit balance checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from shared.keys import load_or_create_signer, public_key_path
from tests.support.jobs import cleanup, fedq, finish, log_events, records, start_run, wait_for

pytestmark = pytest.mark.slow
__all__ = ["cleanup"]  # the fixture, re-exported for these tests


def pids(out: Path) -> dict[str, int]:
    return dict(json.loads((out / "processes.json").read_text()))


def applied(out: Path) -> list[dict[str, Any]]:
    path = out / "ledger.jsonl"
    return [r for r in records(path) if r["fate"] == "applied"] if path.exists() else []


def audit(out: Path) -> dict[str, Any]:
    result = subprocess.run(fedq("audit", str(out), "--json"), capture_output=True, text=True, timeout=120)
    balance: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == (0 if balance["ok"] else 1), result.stderr
    return balance


def assert_balanced(out: Path) -> dict[str, Any]:
    balance = audit(out)
    assert balance["ok"], balance
    assert balance["applied_twice"] == {} and balance["lost"] == 0 and balance["chain_ok"]
    assert balance["sent"] >= balance["applied"] > 0
    return balance


def test_aggregator_killed_with_half_full_buffer(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        "--workers",
        "3",
        "--buffer",
        "4",
        "--target-accuracy",
        "0",
        "--max-updates",
        "48",
        "--max-seconds",
        "200",
        "--log-level",
        "debug",
    )
    log = out / "logs" / "aggregator.log"

    def half_full() -> bool:
        events = log_events(log, "update_buffered")
        return len(applied(out)) >= 8 and bool(events) and 0 < events[-1]["buffered"] < 4

    wait_for(half_full, 150, "a half-full buffer after two versions")
    os.kill(pids(out)["aggregator"], signal.SIGKILL)
    finish(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates", summary
    assert summary["restarts"].get("aggregator") == 1
    assert len(log_events(log, "resumed")) == 2  # the first process and its replacement
    # what the killed aggregator held unacked came back and was applied once
    assert any(r["redelivered"] for r in applied(out))
    assert summary["audit"]["ok"]
    assert_balanced(out)


def test_standby_aggregator_takes_over(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        "--workers",
        "2",
        "--buffer",
        "2",
        "--target-accuracy",
        "0",
        "--max-updates",
        "50",
        "--max-seconds",
        "200",
    )
    wait_for(lambda: len(applied(out)) >= 4, 150, "the job to get going")
    env = {
        **os.environ,
        "FEDQ_NAMESPACE": names.namespace,
        "FEDQ_JOB": "run",
        "FEDQ_STORE": str(out / "store"),
        "FEDQ_KEYS_DIR": str(out / "keys"),
        "FEDQ_TRUSTED_KEYS": str(out / "keys" / "trusted"),
        "FEDQ_OUT": str(out),
        "FEDQ_LOG_JSON": "true",
        "FEDQ_BUFFER": "2",
    }
    standby_key = out / "keys" / "standby.key"
    load_or_create_signer(standby_key)  # enrol it: the coordinator trusts only known aggregators
    (out / "keys" / "trusted" / "standby.pub").write_bytes(public_key_path(standby_key).read_bytes())
    standby_log = out / "logs" / "standby.log"
    with standby_log.open("wb") as fh:
        standby = subprocess.Popen(
            fedq("aggregator", "--key-file", str(standby_key)),
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: bool(log_events(standby_log, "consuming")), 60, "the standby to attach")
        assert not log_events(standby_log, "version")  # single active consumer: it waits
        os.kill(pids(out)["aggregator"], signal.SIGKILL)
        wait_for(lambda: bool(log_events(standby_log, "version")), 60, "the standby to take over")
        finish(proc)
    finally:
        standby.send_signal(signal.SIGTERM)
        standby.wait(20)
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "max_updates"
    assert_balanced(out)


def test_coordinator_restart_resumes_the_job(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        "--workers",
        "3",
        "--buffer",
        "3",
        "--target-accuracy",
        "0",
        "--max-updates",
        "45",
        "--max-seconds",
        "200",
    )
    wait_for(lambda: len(applied(out)) >= 6, 150, "the job to get going")
    issued_before = json.loads((out / "coordinator.json").read_text())["tasks_issued"]
    os.kill(pids(out)["coordinator"], signal.SIGKILL)
    finish(proc)
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
    out = tmp_path / "run"
    finish(
        start_run(
            out,
            names,
            "--workers",
            "4",
            "--buffer",
            "3",
            "--chaos",
            "2",
            "--target-accuracy",
            "0",
            "--max-updates",
            "45",
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


def test_audit_detects_an_update_applied_twice(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    finish(
        start_run(
            out, names, "--workers", "2", "--buffer", "2", "--target-accuracy", "0", "--max-versions", "3"
        )
    )
    assert_balanced(out)
    manifests = sorted((out / "store").rglob("v*.json"))
    v1, v2 = (json.loads(p.read_text()) for p in manifests[1:3])
    v2["update_ids"].append(v1["update_ids"][0])
    manifests[2].write_text(json.dumps(v2))
    balance = audit(out)
    assert not balance["ok"] and list(balance["applied_twice"]) == [v1["update_ids"][0]]
    v2["parent"] = 0
    manifests[2].write_text(json.dumps(v2))
    assert not audit(out)["chain_ok"]
