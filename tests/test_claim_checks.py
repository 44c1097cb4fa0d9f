"""Claim checks: large deltas travel as signed store references; the aggregator fetches and checks them."""

from __future__ import annotations

import hashlib
import json
import random
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
from tests.support.jobs import cleanup, cli, finish, records, start_run
from tests.support.messages import JOB
from tests.support.rigs import AggregatorRig, aggregator_rig

__all__ = ["cleanup"]


async def claim_checked(
    rig: AggregatorRig, *, key: str | None = None, blob: bytes | None = None, store: bool = True
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
        task=rig.token(tid),
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
        for tid, body, blob in bodies:  # the ledger is written once the stored version's updates are acked
            entry = await rig.ledger_entry(tid, "applied")
            assert entry["version"] == 1 and entry["bytes"] == len(body) + len(blob), entry
        await rig.stop_and_assert_all_acked()


async def test_claim_check_with_wrong_bytes_is_rejected(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
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
    """With a 1000-byte inline limit, MNIST-1D's ~34 kB model and its ~9 kB updates all travel as
    store references; the versions they make replay from the log."""
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
            "--local-epochs",
            "1",
            "--target-accuracy",
            "0",
            "--max-versions",
            "2",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions" and summary["audit"]["ok"]
    assert summary["bytes_down"] / summary["tasks_issued"] < 2000  # the ~34 kB model stays in the store
    blobs = list((out / "store").rglob("updates/*.bin"))
    applied = [r for r in records(out / "ledger.jsonl") if r["fate"] == "applied"]
    assert len(blobs) >= len(applied) > 0
    verify = cli("replay", "verify", out, "--all")
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_five_million_parameter_app_travels_by_claim_check(
    tmp_path: Path, names: Names, cleanup: None
) -> None:
    """A 5.1-million-parameter model (~20 MB) and its int8 updates (~5 MB each) travel by claim
    check, and the version they make has learned. To keep the training short, each of the two
    workers holds 2,000 samples (a partition file) and the job stops at version 1 (two updates of
    one epoch each: some 30% accuracy, chance is 10%)."""
    order = random.Random(0).sample(range(16_000), 4_000)  # the MNIST-1D training set holds 16,000
    partition = tmp_path / "partition.json"
    partition.write_text(json.dumps([sorted(order[:2_000]), sorted(order[2_000:])]))
    out = tmp_path / "run"
    finish(
        start_run(
            out,
            names,
            "--app",
            "fedq.apps.wide:app",
            "--workers",
            "2",
            "--partition-file",
            str(partition),
            "--buffer",
            "2",
            "--local-epochs",
            "1",
            "--lr",
            "0.01",
            "--target-accuracy",
            "0",
            "--max-versions",
            "1",
        ),
        timeout=280,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions" and summary["audit"]["ok"]
    model = next((out / "store").rglob("v000000.bin")).stat().st_size
    assert model > 20_000_000  # 5.1 M float32 parameters
    assert summary["bytes_down"] / summary["tasks_issued"] < 2000  # tasks carry references only
    blobs = sorted((out / "store").rglob("updates/*.bin"))
    assert len(blobs) >= 2 and all(
        5_000_000 < b.stat().st_size < 5_500_000 for b in blobs
    )  # int8: ~1 byte a value
    assert summary["final_accuracy"] > 0.2
