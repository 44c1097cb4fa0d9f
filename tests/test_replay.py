"""The update log as a debugging tool: fedq log, fedq replay verify and fedq replay what-if on a real run."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import pytest

from broker_config.names import Names
from broker_config.topology import topology
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import delete_namespace
from tests.support.jobs import (
    TINY_APP,
    cleanup,
    cli,
    copy_run,
    finish,
    json_lines,
    records,
    start_run,
    wait_for,
)

pytestmark = pytest.mark.slow
__all__ = ["cleanup"]  # the fixture, used by the live-job test




def test_verify_all_matches_every_version(run: tuple[Path, Names]) -> None:
    out, _ = run
    result = cli("replay", "verify", str(out), "--all", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = json_lines(result.stdout)
    assert [v["version"] for v in verdicts] == list(range(len(verdicts))) and len(verdicts) >= 7
    assert all(v["ok"] and (v["derived"] is None or v["derived"] == v["expected"]) for v in verdicts)


def test_verify_names_a_tampered_stored_version(run: tuple[Path, Names], tmp_path: Path) -> None:
    out, _ = run
    copy = copy_run(out, tmp_path / "run")
    blob = next((copy / "store").rglob("v000003.bin"))
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0x01
    blob.write_bytes(bytes(data))
    result = cli("replay", "verify", str(copy), "--all")
    assert result.returncode == 1
    assert "v3 " in result.stdout and "MISMATCH" in result.stdout and "failing: [3, 4]" in result.stdout


def test_verify_names_a_tampered_log_entry(run: tuple[Path, Names], amqp_url: str, tmp_path: Path) -> None:
    """Copy the update log into a fresh namespace with one update's payload altered."""
    out, names = run
    forged = Names(f"t-{uuid.uuid4().hex[:10]}")
    v2 = json.loads(next((out / "store").rglob("v000002.json")).read_text())
    victim = v2["update_ids"][0]

    async def copy_log() -> None:
        reader = await RabbitMQ(amqp_url, names, "test-reader").connect()
        try:
            entries = await reader.read_all(names.update_log)
        finally:
            await reader.close()
        broker = await RabbitMQ(amqp_url, forged, "test-forger").connect()
        try:
            await broker.declare(topology(forged, ("cpu",)))
            for e in entries:
                body = e.body
                doc = msgpack.unpackb(body, raw=False)
                head = msgpack.unpackb(doc["head"], raw=False)
                if head.get("task_id") == victim:
                    payload = bytearray(doc["payload"])
                    payload[-1] ^= 0x01
                    doc["payload"] = bytes(payload)
                    body = msgpack.packb(doc, use_bin_type=True)
                await broker.publish("", forged.update_log, body)
        finally:
            await broker.close()

    asyncio.run(copy_log())
    try:
        copy = copy_run(out, tmp_path / "run")
        config = json.loads((copy / "config.json").read_text())
        config["settings"]["namespace"] = forged.namespace
        (copy / "config.json").write_text(json.dumps(config))
        result = cli("replay", "verify", str(copy), "--all")
        assert result.returncode == 1
        assert "v2 " in result.stdout and victim in result.stdout and "tampered" in result.stdout
    finally:
        asyncio.run(delete_namespace(amqp_url, forged, ("cpu",)))


def test_what_if_original_policy_reproduces_and_another_differs(run: tuple[Path, Names]) -> None:
    out, _ = run
    same = cli("replay", "what-if", str(out), "--json")
    assert same.returncode == 0, same.stderr
    doc = json_lines(same.stdout)[-1]
    assert doc["reproduces_original"] is True
    assert doc["what_if"]["shas"] == doc["original"]["shas"]
    other = cli("replay", "what-if", str(out), "--buffer", "5", "--json")
    assert other.returncode == 0, other.stderr
    doc2 = json_lines(other.stdout)[-1]
    assert doc2["reproduces_original"] is False and doc2["policy"]["k"] == 5
    assert doc2["what_if"]["updates"] != doc2["original"]["updates"]
    assert Path(doc2["plot"]).stat().st_size > 1000
    adam = cli("replay", "what-if", str(out), "--server-opt", "adam", "--server-lr", "0.01", "--json")
    assert adam.returncode == 0, adam.stderr
    doc3 = json_lines(adam.stdout)[-1]
    assert doc3["policy"]["server_opt"] == "adam:0.9,0.99,0.001" and doc3["reproduces_original"] is False


def test_log_offsets_times_and_filters(run: tuple[Path, Names]) -> None:
    out, _ = run
    every = json_lines(cli("log", str(out), "--json").stdout)
    applied = sum(len(json.loads(p.read_text())["update_ids"]) for p in (out / "store").rglob("v*.json"))
    assert len(every) >= applied > 0
    assert all(r["signature"] == "valid" for r in every)
    assert {r["fate"].split()[0] for r in every} <= {"applied", "rejected", "pending"}
    offsets = [r["offset"] for r in every]
    assert offsets == sorted(offsets)
    middle = offsets[len(offsets) // 2]
    tail = json_lines(cli("log", str(out), "--from", str(middle), "--json").stdout)
    assert tail and tail[0]["offset"] == middle and len(tail) == len([o for o in offsets if o >= middle])
    assert len(json_lines(cli("log", str(out), "--from", "1h", "--json").stdout)) == len(every)
    later = datetime.now(UTC).isoformat()
    assert json_lines(cli("log", str(out), "--from", later, "--json").stdout) == []
    w = every[0]["worker"]
    mine = json_lines(cli("log", str(out), "--worker", w, "--json").stdout)
    assert mine and all(r["worker"] == w for r in mine)
    assert len(mine) < len(every)
    table = cli("log", str(out), "--versions", "1:2").stdout
    assert "applied v1" in table and "applied v3" not in table
    bad = cli("log", str(out), "--from", "yesterday")
    assert bad.returncode == 2 and "bad offset" in bad.stderr


def test_reading_the_log_does_not_disturb_a_live_job(tmp_path: Path, names: Names, cleanup: None) -> None:
    """``fedq log`` reads the update log again and again while a job runs; the job still ends on
    its own terms with every update accounted for: the reader takes nothing from the live queues."""
    out = tmp_path / "run"
    # A read ends once the log has been quiet 1.5 s. One worker that holds each task 2 s leaves a
    # quiet spell after every update, so reads end while the job runs (two workers at 1 s kept the
    # log busy: a read lasted until the job had stopped). A warm-up of one update (the clip's) and
    # K=1: the first version comes with the first update; the six take some twelve seconds.
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "1",
        "--delay-profile",
        "2.0*1",
        "--buffer",
        "1",
        "--clip",
        "adaptive:3,50,1",
        "--target-accuracy",
        "0",
        "--max-updates",
        "6",
    )
    wait_for(lambda: records(out / "ledger.jsonl"), 120, "the first applied updates", proc)
    read_while_running = []
    while proc.poll() is None:
        result = cli("log", str(out), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        if proc.poll() is None:
            read_while_running.append(len(json_lines(result.stdout)))
    finish(proc)
    assert len(read_while_running) >= 2 and read_while_running[0] > 0, read_while_running
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates" and summary["audit"]["ok"], summary
    assert summary["audit"]["lost"] == 0 and summary["audit"]["applied"] == summary["updates_applied"]
    assert read_while_running[0] < summary["updates_applied"], read_while_running  # it ended mid-job
