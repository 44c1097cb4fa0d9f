"""The broker restarts in the middle of a job: nothing is lost, nothing is counted twice.

A whole ``fedq run`` (aggregator, coordinator, 3 workers, each its own process) runs against a
private RabbitMQ node; once some updates are applied the node is stopped and started again with the
same data directory (durable quorum queues and persistent messages survive). Every service must ride
through on its robust connection and the job must finish with exact accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from broker_config.topology import topology
from shared.broker import Broker, Delivery
from tests.private_broker import (  # noqa: F401  (fixtures used by name)
    PrivateRabbit,
    make_private_rabbit_fixture,
    private_rabbit_fixture,
)

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 330.0  # --max-seconds 240 plus start-up and shutdown


def fedq_run(out: Path, amqp_url: str, namespace: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "FEDQ_LOG_LEVEL": "info"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedq.cli",
            "run",
            "--amqp-url",
            amqp_url,
            "--namespace",
            namespace,
            "--out",
            str(out),
            "--no-progress",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return -1, f"fedq run did not finish in {timeout}s\n{output}"
    return proc.returncode, output


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = {"event": "raw", "line": line}
        out.append(rec if isinstance(rec, dict) else {"event": "raw", "line": line})
    return out


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"fedq run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def problems_in_logs(out: Path) -> str:
    """Errors, tracebacks and broker warnings from every process log, for the failure message."""
    lines = []
    for log in sorted((out / "logs").glob("*.log")):
        for rec in log_records(log):
            level = str(rec.get("level", ""))
            text = json.dumps(rec)[:600]
            if level in ("error", "critical") or "Traceback" in text or rec.get("event") == "raw":
                lines.append(f"{log.name}: {text}")
    return "\n".join(lines[-60:]) or "(no errors in the process logs)"


def manifests(out: Path) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for path in (out / "store").rglob("v*.json"):
        m = json.loads(path.read_text())
        found[int(m["version"])] = m
    return found


def check_exact_accounting(out: Path) -> Counter[str]:
    """Every applied task id once in the ledger and once across the version manifests; the version
    chain is 0..N with each parent the version before."""
    ledger = records(out / "ledger.jsonl")
    applied = Counter(r["task_id"] for r in ledger if r["fate"] == "applied")
    assert applied, "nothing was applied"
    twice = [t for t, n in applied.items() if n > 1]
    assert not twice, f"task ids applied more than once in the ledger: {twice}"
    versions = manifests(out)
    assert sorted(versions) == list(range(len(versions))), f"version numbers have gaps: {sorted(versions)}"
    for v, m in versions.items():
        assert m["parent"] == v - 1, f"version {v} has parent {m['parent']}"
    in_manifests = Counter(t for m in versions.values() for t in m["update_ids"])
    twice = [t for t, n in in_manifests.items() if n > 1]
    assert not twice, f"task ids in more than one version: {twice}"
    assert in_manifests == applied, (
        f"ledger and manifests disagree: only in ledger {set(applied) - set(in_manifests)}, "
        f"only in manifests {set(in_manifests) - set(applied)}"
    )
    for r in ledger:
        if r["fate"] == "applied":
            assert r["task_id"] in versions[r["version"]]["update_ids"], r
    rejected_applied = {r["task_id"] for r in ledger if r["fate"] == "rejected"} & set(applied)
    rejected_reasons = {r["reason"] for r in ledger if r["fate"] == "rejected" and r["task_id"] in applied}
    # A rejected copy of an applied task may only be a recognised duplicate.
    assert rejected_reasons <= {"duplicate"}, (rejected_applied, rejected_reasons)
    return applied


@pytest.mark.timeout(180)
async def test_consumers_and_running_handlers_survive_broker_restart(private_rabbit: PrivateRabbit) -> None:
    """The adapter level: after a restart ``consume`` and ``subscribe`` get messages again, and a
    handler that was running when the link dropped finishes instead of being cancelled; its ack is
    lost, and the broker redelivers the (persistent, quorum-queued) message."""
    names = Names(f"t-{uuid.uuid4().hex[:10]}")
    broker = await Broker(private_rabbit.amqp_url, names, "test-restart-adapter").connect()
    try:
        await broker.declare(topology(names, ("cpu",)))
        tasks: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        events: asyncio.Queue[bytes] = asyncio.Queue()
        in_handler, release = asyncio.Event(), asyncio.Event()
        outcome: dict[str, Any] = {}

        async def on_task(delivery: Delivery) -> None:
            await tasks.put((delivery.body, delivery.redelivered))
            if delivery.body == b"slow" and not delivery.redelivered:
                in_handler.set()
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    outcome["cancelled"] = True
                    raise
                outcome["acked"] = await delivery.ack()
                return
            await delivery.ack()

        async def on_event(delivery: Delivery) -> None:
            await events.put(delivery.body)
            await delivery.ack()

        await broker.consume(names.task_queue("cpu"), on_task, prefetch=1)
        await broker.subscribe(names.workers_exchange, ("",), on_event)
        await broker.publish(names.tasks_exchange, "cpu", b"slow")
        await asyncio.wait_for(in_handler.wait(), 30)

        await asyncio.to_thread(private_rabbit.restart, 2.0)
        release.set()  # the handler goes on after its channel died
        await broker.publish(names.tasks_exchange, "cpu", b"after", mandatory=True)
        await broker.publish(names.workers_exchange, "", b"hello", mandatory=False)

        seen: list[tuple[bytes, bool]] = []
        deadline = time.monotonic() + 60
        while (b"after", False) not in seen or (b"slow", True) not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"after the restart the task consumer got only {seen} (no consumer restored?)")
            with contextlib.suppress(TimeoutError):
                seen.append(await asyncio.wait_for(tasks.get(), remaining))
        assert await asyncio.wait_for(events.get(), 30) == b"hello", "the subscription was not restored"
        assert "cancelled" not in outcome, "a running handler was cancelled when its channel closed"
        assert outcome.get("acked") is False, outcome  # its channel is gone: the ack is lost, not raised
    finally:
        await broker.close()


@pytest.mark.timeout(480)
def test_job_survives_broker_restart(tmp_path: Path, private_rabbit: PrivateRabbit) -> None:
    out = tmp_path / "run"
    namespace = f"t-{uuid.uuid4().hex[:10]}"  # the node is private, but keep the habit
    proc = fedq_run(
        out,
        private_rabbit.amqp_url,
        namespace,
        "--workers",
        "3",
        "--target-accuracy",
        "0",
        "--max-updates",
        "60",
        "--buffer",
        "3",
        "--max-seconds",
        "240",
    )
    try:
        wait_for(lambda: len(records(out / "ledger.jsonl")) >= 6, 150, "6 applied updates", proc)
        before = len(records(out / "ledger.jsonl"))
        restart_started = time.monotonic()
        private_rabbit.restart(down_seconds=3.0)
        restart_seconds = time.monotonic() - restart_started
        code, output = finish(proc, JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    context = (
        f"ledger had {before} lines at the restart (node down for {restart_seconds:.1f}s)\n"
        f"--- fedq run output (tail) ---\n{output[-2500:]}\n"
        f"--- problems in {out}/logs ---\n{problems_in_logs(out)}"
    )
    if code != 0:
        pytest.fail(f"the job did not survive the broker restart (exit {code})\n{context}", pytrace=False)
    summary = json.loads((out / "summary.json").read_text())
    if summary["stop_reason"] != "max_updates":
        pytest.fail(
            f"the job stopped on {summary['stop_reason']!r}, not max_updates, after the broker restart "
            f"(applied {summary.get('updates_applied')}, rejected {summary.get('updates_rejected')})\n{context}",
            pytrace=False,
        )
    applied = check_exact_accounting(out)
    after = [r for r in records(out / "ledger.jsonl") if r["fate"] == "applied"][before:]
    assert after, f"nothing was applied after the restart\n{context}"
    assert summary["updates_applied"] == len(applied)
    assert len(applied) >= 60
