"""Training that outlives the broker's ``consumer_timeout``: the task comes back, counted once.

Our rule: a task is acked only after its update is confirmed, and a task's TTL (``--task-ttl``,
120 s by default) stays well below the broker's ``consumer_timeout`` (30 min by default). If
training outlives the consumer timeout anyway, the broker closes the worker's channel and requeues
the task; the robust channel is reopened, the task is delivered again, and deduplication by task id
(in the worker, and in the aggregator for a copy trained elsewhere) keeps the effect exactly-once.

RabbitMQ 3.10 checks the timeout only when a channel ticks (``channel_tick_interval``, 60 s by
default), so a 3 s timeout alone fires after about a minute; the private node here also ticks
every second, which makes the channel close 3-4 s after the delivery. The module's two tests share
the node (tests/support/private_broker.py); each reads only what the node logged during its own job.

The jobs train the tiny app (a task takes milliseconds): how long a worker holds a task is its
``--delay-profile``, whatever the load on the machine.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from tests.support.jobs import (
    TINY_APP,
    check_exact_accounting,
    finish,
    log_records,
    problems_in_logs,
    records,
    start_run,
)
from tests.support.private_broker import (  # noqa: F401  (fixtures used by name)
    MakeRabbit,
    PrivateRabbit,
    make_private_rabbit_fixture,
)

pytestmark = pytest.mark.slow

TIMEOUT_MS = 3000
TICK_MS = 1000
WORKER_DELAY = 6.0  # seconds a worker holds each task: 2 s past the channel's close at 3-4 s

_CONNECTION_NAME = re.compile(r"connection (<[\d.]+>) \(.*\) has a client-provided name: (\S+)")
_CHANNEL_ERROR = re.compile(r"\] (<[\d.]+>) Channel error on connection (<[\d.]+>)")
_ACK_TIMEOUT = re.compile(r"\] (<[\d.]+>) operation .*delivery acknowledgement on channel \d+ timed out")


def log_sizes(node: PrivateRabbit) -> dict[Path, int]:
    """How far the node's log files go now: ``consumer_timeouts`` reads on from there."""
    return {path: path.stat().st_size for path in node.logs.glob("*.log")}


def consumer_timeouts(node: PrivateRabbit, since: Mapping[Path, int]) -> Counter[str]:
    """How many channels the node closed for an ack timeout after ``since`` (``log_sizes``), by
    client connection name."""
    names: dict[str, str] = {}
    channel_of: dict[str, str] = {}
    found: Counter[str] = Counter()
    for path in sorted(node.logs.glob("*.log")):
        with path.open("rb") as fh:
            fh.seek(since.get(path, 0))
            text = fh.read().decode(errors="replace")
        for line in text.splitlines():
            if m := _CONNECTION_NAME.search(line):
                names[m.group(1)] = m.group(2)
            elif m := _CHANNEL_ERROR.search(line):
                channel_of[m.group(1)] = m.group(2)
            elif m := _ACK_TIMEOUT.search(line):
                found[names.get(channel_of.get(m.group(1), ""), "?")] += 1
    return found


def deliveries(out: Path, worker: str) -> dict[str, list[bool]]:
    """For every task a worker's log mentions, the ``redelivered`` flags it logged."""
    seen: dict[str, list[bool]] = defaultdict(list)
    for rec in log_records(out / "logs" / f"{worker}.log"):
        if "task" in rec and "redelivered" in rec:
            seen[str(rec["task"])].append(bool(rec["redelivered"]))
    return seen


def run_slow_job(
    node: PrivateRabbit, out: Path, updates: int, *args: str
) -> tuple[dict[str, Any], Counter[str]]:
    """A job of ``updates`` updates (K=1) whose workers hold each task ``WORKER_DELAY`` s; its
    summary and the consumer timeouts the node logged meanwhile."""
    since = log_sizes(node)
    proc = start_run(
        out,
        Names(f"t-{uuid.uuid4().hex[:10]}"),
        *TINY_APP,
        "--target-accuracy",
        "0",
        "--max-updates",
        str(updates),
        "--buffer",
        "1",
        "--max-seconds",
        "80",
        *args,
        amqp_url=node.amqp_url,
    )
    output = finish(proc, 110, check=False)
    code = proc.returncode
    context = f"--- fedq run output (tail) ---\n{output[-2000:]}\n--- problems ---\n{problems_in_logs(out)}"
    if code != 0:
        pytest.fail(f"fedq run failed (exit {code})\n{context}", pytrace=False)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["_context"] = context
    return summary, consumer_timeouts(node, since)


@pytest.mark.timeout(150)
def test_task_held_past_consumer_timeout_is_redelivered_and_counted_once(
    tmp_path: Path, make_private_rabbit: MakeRabbit
) -> None:
    node = make_private_rabbit(consumer_timeout_ms=TIMEOUT_MS, channel_tick_ms=TICK_MS)
    out = tmp_path / "run"
    # the default clip (adaptive:3,50,5) holds a job's first 5 updates, its warm-up, before the first
    # version: a warm-up of one, as the buffer, lets the job end after 2 updates of WORKER_DELAY, not 5
    summary, timeouts = run_slow_job(
        node, out, 2, "--workers", "1", "--delay-profile", f"{WORKER_DELAY}*1", "--clip", "adaptive:3,50,1"
    )
    context = summary["_context"]
    # The broker closed the worker's channel for holding its task too long ...
    assert timeouts["fedq-worker-w00"] >= 1, (
        f"no consumer timeout for the worker: {dict(timeouts)}\n{context}"
    )
    # ... the worker's robust channel came back and its task was delivered again ...
    redelivered = {t for t, flags in deliveries(out, "w00").items() if True in flags}
    assert redelivered, f"no task was redelivered to the worker\n{context}"
    # ... and the job still ended on its own terms, every task counted once.
    assert summary["stop_reason"] == "max_updates", f"{summary['stop_reason']}\n{context}"
    applied = check_exact_accounting(out)
    assert len(applied) >= 2
    assert redelivered & set(applied), "a redelivered task should also be an applied one"
    rejected = Counter(r["reason"] for r in records(out / "ledger.jsonl") if r["fate"] == "rejected")
    assert set(rejected) <= {"duplicate"}, rejected


@pytest.mark.timeout(150)
def test_copy_trained_by_a_second_worker_is_rejected_as_duplicate(
    tmp_path: Path, make_private_rabbit: MakeRabbit
) -> None:
    """With a second, idle worker the timed-out task goes to it and is trained twice; the
    aggregator applies the first update and rejects the second as a duplicate."""
    node = make_private_rabbit(consumer_timeout_ms=TIMEOUT_MS, channel_tick_ms=TICK_MS)
    out = tmp_path / "run"
    # three updates: the second copy of the first task (trained 3-4 s + WORKER_DELAY after it was first
    # delivered) reaches the aggregator well before the job ends
    summary, timeouts = run_slow_job(
        node, out, 3, "--workers", "2", "--concurrency", "1", "--delay-profile", f"{WORKER_DELAY}*2"
    )
    context = summary["_context"]
    assert sum(n for name, n in timeouts.items() if name.startswith("fedq-worker-")) >= 1, (
        f"no consumer timeout for a worker: {dict(timeouts)}\n{context}"
    )
    assert summary["stop_reason"] == "max_updates", f"{summary['stop_reason']}\n{context}"
    applied = check_exact_accounting(out)
    ledger = records(out / "ledger.jsonl")
    duplicates = [r for r in ledger if r["fate"] == "rejected" and r["reason"] == "duplicate"]
    assert duplicates, f"no second copy reached the aggregator (no duplicate in the ledger)\n{context}"
    for r in duplicates:
        assert applied[r["task_id"]] == 1, r  # the copy was of an applied task, which stayed applied once
    rejected = {r["reason"] for r in ledger if r["fate"] == "rejected"}
    assert rejected == {"duplicate"}, rejected
