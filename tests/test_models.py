"""``fedq model``: list, show, export and verify a job's stored versions, and roll a job back,
on a finished run and in the middle of a live one."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from broker_config.names import Names
from fedq.audit import balance
from shared.errors import StoreError
from shared.store import Manifest
from tests.support.broker import delete_namespace
from tests.support.jobs import cleanup, finish, log_events, records, start_run, wait_for

__all__ = ["cleanup"]  # the fixture, used by the live-run test


def fedq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedq.cli", *args], capture_output=True, text=True, timeout=180
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def manifests(out: Path) -> dict[int, dict[str, Any]]:
    found = (json.loads(p.read_text()) for p in (out / "store").rglob("v*.json"))
    return {m["version"]: m for m in found}


def model_file(out: Path, manifest: dict[str, Any]) -> Path:
    return out / "store" / manifest["key"]


def copy_run(src: Path, dst: Path) -> Path:
    """A run folder copied elsewhere, its config pointing at the copy (the job and broker stay)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in config["settings"].items():
        if isinstance(value, str) and value.startswith(str(src)):
            config["settings"][key] = str(dst) + value[len(str(src)) :]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# -- without a broker ---------------------------------------------------------------------------


def test_manifest_records_a_rollback_and_old_manifests_still_load() -> None:
    plain = Manifest("j", 3, 2, "ab" * 32, 10, "jobs/j/models/v000003.bin", ("t1",), 1.5)
    assert "rollback_of" not in json.loads(plain.to_json())  # older readers keep reading ordinary versions
    assert Manifest.from_json(plain.to_json()).rollback_of is None
    back = Manifest("j", 4, 3, "cd" * 32, 10, "jobs/j/models/v000004.rollback.bin", (), 2.5, rollback_of=1)
    assert Manifest.from_json(back.to_json()) == back
    old = {k: v for k, v in json.loads(plain.to_json()).items() if k not in ("update_digests", "rollback_of")}
    assert Manifest.from_json(json.dumps(old)).rollback_of is None
    with pytest.raises(StoreError):
        Manifest.from_json(json.dumps({**json.loads(back.to_json()), "rollback_of": "one"}))


def test_audit_balance_ignores_rollback_records() -> None:
    chain = [
        {"version": 0, "parent": -1, "update_ids": []},
        {"version": 1, "parent": 0, "update_ids": ["a", "b"]},
        {"version": 2, "parent": 1, "update_ids": ["c", "d"]},
        {"version": 3, "parent": 2, "update_ids": []},  # the rollback to v1
        {"version": 4, "parent": 3, "update_ids": ["e", "f"]},
    ]
    ledger: list[dict[str, Any]] = [
        {"task_id": t, "worker_id": "w0", "fate": "applied", "version": 1 + i // 2}
        for i, t in enumerate("abcd")
    ]
    ledger += [{"t": 1.0, "fate": "rollback", "version": 3, "rollback_of": 1, "parent": 2, "sha256": "x"}]
    ledger += [{"task_id": t, "worker_id": "w1", "fate": "applied", "version": 4} for t in "ef"]
    sent = dict.fromkeys("abcd", "w0") | dict.fromkeys("ef", "w1")
    with_rollback = balance("j", chain, ledger, sent, 0)
    without = balance("j", chain, [r for r in ledger if r["fate"] != "rollback"], sent, 0)
    assert with_rollback.ok and with_rollback.chain_ok and with_rollback.lost == 0
    assert with_rollback.to_dict() == without.to_dict()
    assert with_rollback.applied == 6 and with_rollback.rejected == {} and with_rollback.pending == []
    assert set(with_rollback.per_worker) == {"w0", "w1"}  # no worker "?" or "" from the rollback record


# -- a finished run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Names]]:
    """One finished run shared by the tests below; they change only copies of it."""
    names = Names(f"t-{uuid.uuid4().hex[:10]}")
    out = tmp_path_factory.mktemp("models") / "run"
    finish(
        start_run(
            out, names, "--workers", "2", "--buffer", "2", "--target-accuracy", "0", "--max-versions", "4"
        )
    )
    yield out, names
    asyncio.run(delete_namespace(amqp_url, names, ("cpu",)))


@pytest.mark.slow
def test_list_shows_every_version(run: tuple[Path, Names]) -> None:
    out, _ = run
    stored = manifests(out)
    result = fedq("model", "list", str(out), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json_lines(result.stdout)
    assert [r["version"] for r in rows] == sorted(stored) and len(rows) >= 5
    metrics = {m["version"]: m for m in records(out / "metrics.jsonl")}
    for r in rows:
        m = stored[r["version"]]
        assert (r["parent"], r["sha256"], r["size"], r["created_at"]) == (
            m["parent"],
            m["sha256"],
            m["size"],
            m["created_at"],
        )
        assert r["updates"] == len(m["update_ids"]) and r["mean_staleness"] == m["mean_staleness"]
        assert r["accuracy"] == (metrics[r["version"]]["accuracy"] if r["version"] in metrics else None)
        assert r["rollback_of"] is None
    table = fedq("model", "list", str(out))
    assert table.returncode == 0
    for v, m in stored.items():
        assert any(line.split()[:2] == [str(v), str(m["parent"])] for line in table.stdout.splitlines())
        assert m["sha256"][:12] in table.stdout
    shown = fedq("model", "show", str(out), "1", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["manifest"] == stored[1] and doc["metrics"] == metrics.get(1)


@pytest.mark.slow
def test_export_loads_into_the_apps_model(run: tuple[Path, Names], tmp_path: Path) -> None:
    from fedq.apps.mnist1d import app

    out, _ = run
    metrics = {m["version"]: m for m in records(out / "metrics.jsonl")}
    version = max(v for v in metrics if v > 0)
    path = tmp_path / "model.pt"
    result = fedq("model", "export", str(out), str(version), str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    state = torch.load(path, weights_only=True)
    torch.set_num_threads(1)
    net = app.build_model(0)
    net.load_state_dict(state)
    assert app.evaluate(net)["accuracy"] == pytest.approx(metrics[version]["accuracy"], abs=1e-6)
    assert fedq("model", "export", str(out), "99", str(tmp_path / "x.pt")).returncode == 2


@pytest.mark.slow
def test_verify_names_a_changed_model(run: tuple[Path, Names], tmp_path: Path) -> None:
    out, _ = run
    result = fedq("model", "verify", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = copy_run(out, tmp_path / "run")
    blob = model_file(copy, manifests(copy)[2])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    result = fedq("model", "verify", str(copy))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failing: v2" in result.stdout
    verdicts = json_lines(fedq("model", "verify", str(copy), "--json").stdout)
    assert [v["version"] for v in verdicts if not v["ok"]] == [2]
    assert fedq("model", "export", str(copy), "2", str(tmp_path / "v2.pt")).returncode == 4  # StoreError


@pytest.mark.slow
def test_rollback_on_a_finished_run(run: tuple[Path, Names], tmp_path: Path) -> None:
    out, _ = run
    copy = copy_run(out, tmp_path / "run")
    before = manifests(copy)
    latest = max(before)
    applied_before = json.loads(fedq("audit", str(copy), "--json").stdout)["applied"]

    result = fedq("model", "rollback", str(copy), "--to", "1", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    done = json.loads(result.stdout)
    assert done["version"] == latest + 1 and done["parent"] == latest and done["rollback_of"] == 1
    assert done["announced"] is True
    after = manifests(copy)
    new = after[latest + 1]
    assert new["sha256"] == before[1]["sha256"] == done["sha256"]
    assert new["parent"] == latest and new["update_ids"] == [] and new["rollback_of"] == 1
    assert model_file(copy, new).read_bytes() == model_file(copy, before[1]).read_bytes()
    assert {v: m for v, m in after.items() if v <= latest} == before  # history untouched
    last = records(copy / "ledger.jsonl")[-1]
    assert (last["fate"], last["version"], last["rollback_of"]) == ("rollback", latest + 1, 1)
    assert (copy / "keys" / "trusted" / "operator.pub").read_bytes() == (
        copy / "keys" / "operator.pub"
    ).read_bytes()

    rows = json_lines(fedq("model", "list", str(copy), "--json").stdout)
    assert rows[-1]["version"] == latest + 1 and rows[-1]["rollback_of"] == 1
    assert fedq("model", "verify", str(copy)).returncode == 0
    audit = fedq("audit", str(copy), "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    balance_after = json.loads(audit.stdout)
    assert balance_after["ok"] and balance_after["chain_ok"] and balance_after["applied"] == applied_before
    replay = fedq("replay", "verify", str(copy), "--all", "--json")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    verdict = {v["version"]: v for v in json_lines(replay.stdout)}[latest + 1]
    assert verdict["ok"] and verdict["derived"] == before[1]["sha256"]

    # nothing to roll back to: the latest version itself, or a version that does not exist
    assert fedq("model", "rollback", str(copy), "--to", str(latest + 1), "--no-announce").returncode == 2
    assert fedq("model", "rollback", str(copy), "--to", "99", "--no-announce").returncode == 2
    assert max(manifests(copy)) == latest + 1


# -- a live run -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rollback_during_a_live_run(names: Names, tmp_path: Path, cleanup: None) -> None:
    """Roll a running job back to version 1: the coordinator adopts the new version and hands out
    tasks on it, the aggregator folds on from it, and the job ends balanced and replayable."""
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        "--workers",
        "2",
        "--buffer",
        "4",
        "--target-accuracy",
        "0.99",
        "--max-versions",
        "8",
        "--max-seconds",
        "200",
    )
    try:
        wait_for(lambda: len(manifests(out)) >= 3, 150, "version 2")
        job = json.loads((out / "config.json").read_text())["settings"]["job"]
        aggregator = json.loads((out / "processes.json").read_text())["aggregator"]
        seen = max(manifests(out))
        wait_for(lambda: max(manifests(out)) > seen, 60, "a fresh version")
        # Hold the aggregator still (stopped, not killed) while rolling back, so that the coordinator
        # provably adopts the rollback before any update can make a newer version. Right after a
        # version its buffer (K=4) is nearly empty: when it resumes, the updates it held or that
        # queued up fill no buffer at once, and their receipts make the coordinator top up with
        # tasks on the rollback version.
        os.kill(aggregator, signal.SIGSTOP)
        try:
            latest = max(manifests(out))
            while (out / "store" / "jobs" / job / "models" / f"v{latest + 1:06d}.bin").exists():
                os.kill(aggregator, signal.SIGCONT)  # stopped halfway through storing a version
                time.sleep(0.5)
                os.kill(aggregator, signal.SIGSTOP)
                latest = max(manifests(out))
            result = fedq("model", "rollback", str(out), "--to", "1", "--json")
            assert result.returncode == 0, result.stdout + result.stderr
            rolled = json.loads(result.stdout)["version"]
            assert rolled == latest + 1
            wait_for(
                lambda: any(
                    e["version"] == rolled for e in log_events(out / "logs" / "coordinator.log", "evaluated")
                ),
                30,
                "the coordinator to adopt and evaluate the rollback version",
            )
        finally:
            os.kill(aggregator, signal.SIGCONT)
        finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions", summary
    assert summary["audit"]["ok"], summary["audit"]
    stored = manifests(out)
    assert stored[rolled]["sha256"] == stored[1]["sha256"] and stored[rolled]["rollback_of"] == 1
    assert stored[rolled + 1]["parent"] == rolled and stored[rolled + 1]["update_ids"]
    assert any(r.get("fate") == "rollback" and r["version"] == rolled for r in records(out / "ledger.jsonl"))
    # the aggregator adopted it by itself, from the store, before it took its next update
    caught_up = log_events(out / "logs" / "aggregator.log", "caught_up")
    assert any(e["version"] >= rolled for e in caught_up), caught_up
    # tasks were handed out on the rollback version, trained, and their updates applied
    started = [e for w in ("w00", "w01") for e in log_events(out / "logs" / f"{w}.log", "task_started")]
    assert any(e["version"] == rolled for e in started)
    logged = json_lines(fedq("log", str(out), "--json").stdout)
    on_rollback = [r for r in logged if r["base_version"] == rolled]
    assert any(r["fate"].startswith("applied") for r in on_rollback), on_rollback
    audit = fedq("audit", str(out))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    replay = fedq("replay", "verify", str(out), "--all")
    assert replay.returncode == 0, replay.stdout + replay.stderr
