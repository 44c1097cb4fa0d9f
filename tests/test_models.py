"""``fedq model``: list, show, export and verify a job's stored versions, and roll a job back,
on a finished run and in the middle of a live one."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from broker_config.names import Names
from fedq.audit import balance
from fedq.keys import init
from fedq.models import Request, check_version, open_models, run, write_rollback
from fedq.run import run_pids
from shared.app import load_app
from shared.errors import ConfigError, StoreError, UnsignedVersionError
from shared.keys import load_or_create_signer
from shared.privacy import DP_ACCOUNTING
from shared.settings import Settings
from shared.signing import Keyring, Signer, fingerprint
from shared.store import SERVER_STATE, Manifest, ModelStore, manifest_key, model_key
from tests.support.jobs import (
    TINY_APP,
    cleanup,
    cli,
    copy_run,
    finish,
    json_lines,
    log_events,
    manifests,
    records,
    start_run,
    wait_for,
)

__all__ = ["cleanup"]  # the fixture, used by the live-run test


def model_file(out: Path, manifest: dict[str, Any]) -> Path:
    return out / "store" / str(manifest["key"])


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


# -- signed versions, on a local store (no broker) -----------------------------------------------


def _version(job: str, v: int, blob: bytes, **extra: Any) -> Manifest:
    return Manifest(
        job, v, v - 1, hashlib.sha256(blob).hexdigest(), len(blob), model_key(job, v), (), 1.0 + v, **extra
    )


def signed_job(tmp_path: Path) -> Settings:
    """A job of four versions: v0 by the coordinator, v1 and v2 by the aggregator, v3 by nobody."""
    keys = tmp_path / "keys"
    init(keys, keys / "trusted")
    coordinator, aggregator = (
        load_or_create_signer(keys / f"{r}.key") for r in ("coordinator", "aggregator")
    )
    settings = Settings(store=str(tmp_path / "store"), job="j", keys_dir=str(keys), out=str(tmp_path / "out"))
    store = ModelStore(open_models(settings).objects, "j")

    async def fill() -> None:
        for v in range(4):
            blob = bytes([v]) * 64
            m = _version("j", v, blob)
            m = m.signed_by(coordinator) if v == 0 else m.signed_by(aggregator) if v < 3 else m
            await store.save(m, blob)

    asyncio.run(fill())
    return settings


def test_verify_refuses_a_version_nobody_trusted_signed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = signed_job(tmp_path)
    store = open_models(settings)
    problems = {v: asyncio.run(check_version(store, v)) for v in range(4)}
    assert problems[0] == problems[1] == problems[2] == []
    assert len(problems[3]) == 1 and problems[3][0].startswith("unsigned_version")
    # a manifest changed after signing, or signed by a key of the wrong role, is no better
    manifest_file = tmp_path / "store" / manifest_key("j", 2)
    doc = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**doc, "mean_staleness": 9.0}))
    assert asyncio.run(check_version(store, 2))[0].startswith("unsigned_version")
    worker = Signer.generate()
    blob = bytes([1]) * 64
    asyncio.run(
        store.objects.put(manifest_key("j", 1), _version("j", 1, blob).signed_by(worker).to_json().encode())
    )
    assert "not among the trusted keys" in asyncio.run(check_version(store, 1))[0]
    capsys.readouterr()

    assert asyncio.run(run(settings, Request("verify", "j", as_json=True))) == 1
    verdicts = {r["version"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert [v for v, r in verdicts.items() if not r["ok"]] == [1, 2, 3]
    assert asyncio.run(run(settings, Request("verify", "j"))) == 1
    assert "v3      UNSIGNED" in capsys.readouterr().out


def test_verify_refuses_a_version_signed_for_an_earlier_run_of_the_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Version 2 replaced by one the same aggregator key signed in an earlier run that used the same
    job id: its signature verifies, but it is not this run's (version 0's incarnation)."""
    settings = signed_job(tmp_path)
    store = open_models(settings)
    aggregator = load_or_create_signer(Path(settings.keys_dir) / "aggregator.key")
    blob = bytes([2]) * 64
    earlier = _version("j", 2, blob, incarnation="0badc0de0badc0de").signed_by(aggregator)
    asyncio.run(store.objects.put(manifest_key("j", 2), earlier.to_json().encode()))
    earlier.verify(store.trust or Keyring())  # the signature alone is good
    problems = asyncio.run(check_version(store, 2))
    assert len(problems) == 1 and problems[0].startswith("unsigned_version") and "another run" in problems[0]
    with pytest.raises(UnsignedVersionError, match="another run"):
        asyncio.run(store.manifest(2))
    assert asyncio.run(check_version(store, 1)) == []
    assert asyncio.run(run(settings, Request("verify", "j", as_json=True))) == 1
    verdicts = {r["version"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not verdicts[2]["ok"] and verdicts[1]["ok"]


def test_list_and_show_say_who_signed_each_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = signed_job(tmp_path)
    keys = Path(settings.keys_dir)
    aggregator = fingerprint(load_or_create_signer(keys / "aggregator.key").public)
    assert (
        asyncio.run(run(settings, Request("list", "j", as_json=True))) == 0
    )  # an unsigned version fails nothing
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["signed"], r["signer_role"]) for r in rows] == [
        (True, "coordinator"),
        (True, "aggregator"),
        (True, "aggregator"),
        (False, None),
    ]
    assert rows[1]["signer"] == aggregator and rows[3]["signature_problem"].startswith("unsigned_version")
    assert asyncio.run(run(settings, Request("list", "j"))) == 0
    table = capsys.readouterr().out
    assert f"signed by aggregator {aggregator}" in table and "UNSIGNED (unsigned_version" in table
    assert asyncio.run(run(settings, Request("show", "j", version=3, as_json=True))) == 0
    assert json.loads(capsys.readouterr().out)["signature"]["signed"] is False
    assert asyncio.run(run(settings, Request("show", "j", version=1))) == 0
    assert f"signed by       aggregator key {aggregator}" in capsys.readouterr().out


def test_rollback_is_signed_by_the_operator_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = signed_job(tmp_path)
    store = open_models(settings)
    operator = load_or_create_signer(Path(settings.keys_dir) / "operator.key")
    back = asyncio.run(write_rollback(store, 1, operator, settle=0.0))
    assert (back.version, back.parent, back.rollback_of, back.signer) == (4, 3, 1, operator.fingerprint)
    assert asyncio.run(store.manifest(4)) == back  # read through the trust directory: it verifies
    assert asyncio.run(check_version(store, 4)) == []
    # never to a version nobody trusted made
    with pytest.raises(UnsignedVersionError, match="not signed"):
        asyncio.run(write_rollback(store, 3, operator, settle=0.0))
    # the command: signed by <keys-dir>/operator.key, refused before anything is written if it is not trusted
    assert asyncio.run(run(settings, Request("rollback", "j", version=2, announce=False, as_json=True))) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["version"] == 5 and done["signer"] == operator.fingerprint
    stranger = dataclasses.replace(
        settings, keys_dir=str(tmp_path / "elsewhere"), trusted_keys=str(Path(settings.keys_dir) / "trusted")
    )
    with pytest.raises(ConfigError, match="not trusted"):
        asyncio.run(run(stranger, Request("rollback", "j", version=2, announce=False)))
    assert asyncio.run(store.latest()) == 5


def test_a_rollback_restarts_the_server_optimizer_and_keeps_the_privacy_spent(tmp_path: Path) -> None:
    """Its version stores no moments (FedOpt starts afresh from the restored model: the moments it
    names would be another version's), and carries the DP accounting on: epsilon never goes back."""
    settings = signed_job(tmp_path)
    aggregator = load_or_create_signer(Path(settings.keys_dir) / "aggregator.key")
    store = open_models(settings)
    blob, state = bytes([4]) * 64, b"moments of v4"
    policy = {
        SERVER_STATE: {"sha256": hashlib.sha256(state).hexdigest(), "size": len(state)},
        DP_ACCOUNTING: {"epsilon": 3.5, "events": [[1.0, 4]], "counts": {}},
    }
    asyncio.run(store.save(_version("j", 4, blob, policy=policy).signed_by(aggregator), blob, state))
    assert asyncio.run(store.load_state(asyncio.run(store.manifest(4)))) == state
    operator = load_or_create_signer(Path(settings.keys_dir) / "operator.key")
    back = asyncio.run(write_rollback(store, 1, operator, settle=0.0))
    assert SERVER_STATE not in back.policy and asyncio.run(store.load_state(back)) is None
    assert back.dp_epsilon == 3.5


# -- a finished run -----------------------------------------------------------------------------


@pytest.mark.slow
def test_list_shows_every_version(run: tuple[Path, Names]) -> None:
    out, _ = run
    stored = manifests(out)
    result = cli("model", "list", str(out), "--json")
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
    table = cli("model", "list", str(out))
    assert table.returncode == 0
    for v, m in stored.items():
        assert any(line.split()[:2] == [str(v), str(m["parent"])] for line in table.stdout.splitlines())
        assert m["sha256"][:12] in table.stdout
    shown = cli("model", "show", str(out), "1", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["manifest"] == stored[1] and doc["metrics"] == metrics.get(1)


@pytest.mark.slow
def test_export_loads_into_the_apps_model(run: tuple[Path, Names], tmp_path: Path) -> None:
    out, _ = run
    app = load_app(json.loads((out / "config.json").read_text())["settings"]["app"])
    metrics = {m["version"]: m for m in records(out / "metrics.jsonl")}
    version = max(v for v in metrics if v > 0)
    path = tmp_path / "model.pt"
    result = cli("model", "export", str(out), str(version), str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    state = torch.load(path, weights_only=True)
    torch.set_num_threads(1)
    net = app.build_model(0)
    net.load_state_dict(state)
    assert app.evaluate(net)["accuracy"] == pytest.approx(metrics[version]["accuracy"], abs=1e-6)
    assert cli("model", "export", str(out), "99", str(tmp_path / "x.pt")).returncode == 2


@pytest.mark.slow
def test_verify_names_a_changed_model(run: tuple[Path, Names], tmp_path: Path) -> None:
    out, _ = run
    result = cli("model", "verify", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = copy_run(out, tmp_path / "run")
    blob = model_file(copy, manifests(copy)[2])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    result = cli("model", "verify", str(copy))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failing: v2" in result.stdout
    verdicts = json_lines(cli("model", "verify", str(copy), "--json").stdout)
    assert [v["version"] for v in verdicts if not v["ok"]] == [2]
    assert cli("model", "export", str(copy), "2", str(tmp_path / "v2.pt")).returncode == 4  # StoreError


@pytest.mark.slow
def test_rollback_on_a_finished_run(run: tuple[Path, Names], tmp_path: Path) -> None:
    out, _ = run
    copy = copy_run(out, tmp_path / "run")
    before = manifests(copy)
    latest = max(before)
    applied_before = json.loads(cli("audit", str(copy), "--json").stdout)["applied"]

    result = cli("model", "rollback", str(copy), "--to", "1", "--json")
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
    operator = fingerprint(load_or_create_signer(copy / "keys" / "operator" / "operator.key").public)
    assert (copy / "keys" / "trusted" / "operator" / f"{operator}.pub").read_bytes() == (
        copy / "keys" / "operator" / "operator.pub"
    ).read_bytes()
    assert not (copy / "keys" / "operator.key").exists()  # the one fedq run made, not a second one
    assert done["signer"] == operator and new["signer"] == operator  # the manifest is the operator's

    rows = json_lines(cli("model", "list", str(copy), "--json").stdout)
    assert rows[-1]["version"] == latest + 1 and rows[-1]["rollback_of"] == 1
    assert (rows[-1]["signed"], rows[-1]["signer_role"]) == (True, "operator")
    assert cli("model", "verify", str(copy)).returncode == 0
    audit = cli("audit", str(copy), "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    balance_after = json.loads(audit.stdout)
    assert balance_after["ok"] and balance_after["chain_ok"] and balance_after["applied"] == applied_before
    replay = cli("replay", "verify", str(copy), "--all", "--json")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    verdict = {v["version"]: v for v in json_lines(replay.stdout)}[latest + 1]
    assert verdict["ok"] and verdict["derived"] == before[1]["sha256"]

    # nothing to roll back to: the latest version itself, or a version that does not exist
    assert cli("model", "rollback", str(copy), "--to", str(latest + 1), "--no-announce").returncode == 2
    assert cli("model", "rollback", str(copy), "--to", "99", "--no-announce").returncode == 2
    assert max(manifests(copy)) == latest + 1


# -- a live run -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rollback_during_a_live_run(names: Names, tmp_path: Path, cleanup: None) -> None:
    """Roll a running job back to version 1: the coordinator adopts the new version and hands out
    tasks on it, the aggregator folds on from it, and the job ends balanced and replayable."""
    out = tmp_path / "run"
    # One task in flight at a time, each held 0.3 s: a version (K=4) every second and a half or
    # so, and at most one update waiting while the aggregator is held still below.
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "2",
        "--delay-profile",
        "0.3*2",
        "--concurrency",
        "1",
        "--buffer",
        "4",
        "--target-accuracy",
        "0",
        "--max-versions",
        "7",
        "--max-seconds",
        "200",
    )
    try:
        wait_for(lambda: len(manifests(out)) >= 2, 150, "version 1")
        job = json.loads((out / "config.json").read_text())["settings"]["job"]
        aggregator = run_pids(out)["aggregator"]
        seen = max(manifests(out))
        wait_for(lambda: max(manifests(out)) > seen, 60, "a fresh version")
        # Hold the aggregator still (stopped, not killed) while rolling back, so that the coordinator
        # provably adopts the rollback before any update can make a newer version. Right after a
        # version its buffer (K=4) is nearly empty: when it resumes, the updates it held and the one
        # that queued up fill no buffer at once, and their receipts make the coordinator top up with
        # tasks on the rollback version.
        os.kill(aggregator, signal.SIGSTOP)
        try:
            latest = max(manifests(out))
            while (out / "store" / "jobs" / job / "models" / f"v{latest + 1:06d}.bin").exists():
                os.kill(aggregator, signal.SIGCONT)  # stopped halfway through storing a version
                time.sleep(0.5)
                os.kill(aggregator, signal.SIGSTOP)
                latest = max(manifests(out))
            result = cli("model", "rollback", str(out), "--to", "1", "--json")
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
    logged = json_lines(cli("log", str(out), "--json").stdout)
    on_rollback = [r for r in logged if r["base_version"] == rolled]
    assert any(r["fate"].startswith("applied") for r in on_rollback), on_rollback
    audit = cli("audit", str(out))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    replay = cli("replay", "verify", str(out), "--all")
    assert replay.returncode == 0, replay.stdout + replay.stderr
