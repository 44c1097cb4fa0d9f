"""The broker restarts in the middle of a job: nothing is lost, nothing is counted twice.

A whole ``fedq run`` (aggregator, coordinator, 2 workers, each its own process) runs against a
private RabbitMQ node; once some updates are applied the node is stopped and started again with the
same data directory (durable quorum queues and persistent messages survive). Every service must ride
through on its robust connection and the job must finish with exact accounting. The module's two
tests share the node (tests/support/private_broker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from broker_config.topology import topology
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from tests.support.jobs import (
    TINY_APP,
    check_exact_accounting,
    finish,
    problems_in_logs,
    records,
    start_run,
    stop_run,
    wait_for,
)
from tests.support.private_broker import (  # noqa: F401  (fixtures used by name)
    PrivateRabbit,
    make_private_rabbit_fixture,
    private_rabbit_fixture,
)

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 330.0  # --max-seconds 240 plus start-up and shutdown


@pytest.mark.timeout(180)
async def test_consumers_and_running_handlers_survive_broker_restart(private_rabbit: PrivateRabbit) -> None:
    """The adapter level: after a restart ``consume`` and ``subscribe`` get messages again, and a
    handler that was running when the link dropped finishes instead of being cancelled; its ack is
    lost, and the broker redelivers the (persistent, quorum-queued) message."""
    names = Names(f"t-{uuid.uuid4().hex[:10]}")
    broker = await RabbitMQ(private_rabbit.amqp_url, names, "test-restart-adapter").connect()
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
        await broker.subscribe(names.workers_exchange, (names.hello_key,), on_event)
        await broker.publish(names.tasks_exchange, names.task_key("cpu"), b"slow")
        await asyncio.wait_for(in_handler.wait(), 30)

        await asyncio.to_thread(private_rabbit.restart, 2.0)
        release.set()  # the handler goes on after its channel died
        await broker.publish(names.tasks_exchange, names.task_key("cpu"), b"after", mandatory=True)
        await broker.publish(names.workers_exchange, names.hello_key, b"hello", mandatory=False)

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
    names = Names(f"t-{uuid.uuid4().hex[:10]}")  # the node is private, but keep the habit
    # The tiny app, each task held 0.5 s: some four updates a second, so most of the 40 are still
    # to come when the node goes down (stopping it takes a few seconds, in which the job goes on).
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "2",
        "--delay-profile",
        "0.5*2",
        "--target-accuracy",
        "0",
        "--max-updates",
        "40",
        "--buffer",
        "3",
        "--max-seconds",
        "240",
        amqp_url=private_rabbit.amqp_url,
    )
    try:
        wait_for(lambda: len(records(out / "ledger.jsonl")) >= 6, 150, "6 applied updates", proc)
        before = len(records(out / "ledger.jsonl"))
        restart_started = time.monotonic()
        private_rabbit.restart(down_seconds=3.0)
        restart_seconds = time.monotonic() - restart_started
        output = finish(proc, JOB_TIMEOUT, check=False)
        code = proc.returncode
    finally:
        stop_run(proc)
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
    assert len(applied) >= 40
