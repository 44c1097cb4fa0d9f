"""Claim checks: large deltas travel as signed store references; the aggregator fetches and checks them."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import pytest
import torch

from broker_config.names import Names
from shared.codec import encode
from shared.messages import Update
from shared.quantize import encode_delta
from shared.transport.rabbitmq import RabbitMQ
from tests.support.jobs import cleanup, finish, records, start_run
from tests.test_rejections import JOB, Rig, aggregator_rig

__all__ = ["cleanup"]


async def claim_checked(
    rig: Rig, *, key: str | None = None, blob: bytes | None = None, store: bool = True
) -> tuple[str, bytes, bytes]:
    """A valid delta put in the store under ``key``; returns (task id, message, blob)."""
    tid = uuid.uuid4().hex
    spec = rig.model.spec
    delta = blob or encode_delta(
        torch.full((spec.n_float,), 0.01), torch.zeros(spec.n_exact, dtype=torch.int64), spec, "int8", 256
    )
    key = key or f"jobs/{JOB}/updates/{tid}.bin"
    if store:
        await rig.store.objects.put(key, delta)
    update = Update(
        task_id=tid,
        job_id=JOB,
        worker_id="w1",
        base_version=0,
        num_samples=10,
        quant="int8",
        block=256,
        sent_at=time.time(),
        delta_key=key,
        delta_sha256=hashlib.sha256(delta).hexdigest(),
        delta_size=len(delta),
    )
    return tid, encode(update, rig.worker), delta


async def test_claim_checked_update_is_applied(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=2) as rig:
        bodies = []
        for _ in range(2):
            tid, body, blob = await claim_checked(rig)
            bodies.append((tid, body, blob))
            await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == tuple(t for t, _, _ in bodies)
        applied = [r for r in rig.ledger() if r["fate"] == "applied"]
        assert all(r["bytes"] == len(b) + len(blob) for r, (_, b, blob) in zip(applied, bodies, strict=True))
        await rig.stop_and_assert_all_acked()


async def test_claim_check_with_wrong_bytes_is_rejected(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path) as rig:
        tid, body, blob = await claim_checked(rig)
        await rig.store.objects.put(f"jobs/{JOB}/updates/{tid}.bin", blob[:-1] + bytes([blob[-1] ^ 1]))
        await rig.send(body)
        await rig.rejected(body, "bad_payload", tid)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_claim_check_with_missing_blob_is_rejected(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(broker, names, tmp_path) as rig:
        tid, body, _ = await claim_checked(rig, store=False)
        await rig.send(body)
        entry = await rig.rejected(body, "payload_missing", tid)
        assert "not in the store" in entry["detail"]
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_claim_check_outside_the_updates_area_is_rejected(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(broker, names, tmp_path) as rig:
        tid, body, _ = await claim_checked(rig, key=f"jobs/{JOB}/models/v000000.bin", store=False)
        await rig.send(body)
        await rig.rejected(body, "bad_payload", tid)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


@pytest.mark.slow
def test_job_with_everything_by_reference(tmp_path: Path, names: Names, cleanup: None) -> None:
    out = tmp_path / "run"
    finish(
        start_run(
            out,
            names,
            "--workers",
            "2",
            "--buffer",
            "2",
            "--inline-limit",
            "1000",
            "--target-accuracy",
            "0",
            "--max-versions",
            "4",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions" and summary["audit"]["ok"]
    assert summary["bytes_down"] / summary["tasks_issued"] < 2000  # the ~34 kB model stays in the store
    blobs = list((out / "store").rglob("updates/*.bin"))
    applied = [r for r in records(out / "ledger.jsonl") if r["fate"] == "applied"]
    assert len(blobs) >= len(applied) > 0
    import subprocess
    import sys

    verify = subprocess.run(
        [sys.executable, "-m", "fedq.cli", "replay", "verify", str(out), "--all"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_five_million_parameter_app_travels_by_claim_check(
    tmp_path: Path, names: Names, cleanup: None
) -> None:
    out = tmp_path / "run"
    finish(
        start_run(
            out,
            names,
            "--app",
            "fedq.apps.wide:app",
            "--workers",
            "2",
            "--buffer",
            "2",
            "--local-epochs",
            "1",
            "--lr",
            "0.01",
            "--target-accuracy",
            "0",
            "--max-versions",
            "2",
        ),
        timeout=280,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions" and summary["audit"]["ok"]
    model = next((out / "store").rglob("v000000.bin")).stat().st_size
    assert model > 20_000_000  # 5.1 M float32 parameters
    assert summary["bytes_down"] / summary["tasks_issued"] < 2000  # tasks carry references only
    blobs = sorted((out / "store").rglob("updates/*.bin"))
    assert blobs and all(5_000_000 < b.stat().st_size < 5_500_000 for b in blobs)  # int8: ~1 byte a value
    assert summary["final_accuracy"] > 0.2
