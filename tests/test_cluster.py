"""A job on a 3-node RabbitMQ cluster loses one node, then another: nothing is lost or counted twice.

The cluster is private (tests/support/private_cluster.py): three nodes on this machine, joined by
classic_config peer discovery. Every process gets all three URLs (``--amqp-url`` as a list) and
starts on one of them: the run's own processes on node 0, two workers started beside it on nodes 1
and 2 (``--amqp-first``). RabbitMQ 3.10 puts a member of every quorum queue and stream on all
three nodes by default (measured: no ``x-quorum-initial-group-size`` or ``x-initial-cluster-size``
needed), so the job's queues and its update log survive the loss of any one node.

Node 0 is SIGKILLed mid-job (the aggregator, the coordinator and one worker lose their link and
go on to the next node) and started again with its data a few seconds later; once it is back in
the cluster with its queue members online, node 1 is SIGKILLed in turn and started again while the
job goes on to its target. The coordinator is held still (SIGSTOP) while node 0 restarts, so that
the job cannot end before the second kill however slow the restart is.

On RabbitMQ 3.10.8 a publish routed to a stream (the update and model logs) may be nacked, or go
unconfirmed until the client's 30 s timeout, for as long as a node that held a member is down:
fedq retries it (a duplicate is counted once), so the updates applied while a node is down are
measured (printed with -s), not required.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from broker_config.names import Names
from fedq.run import run_pids
from tests.support.jobs import (
    TINY_APP,
    assert_balanced,
    audit,
    check_exact_accounting,
    enrol,
    fedq,
    finish,
    problems_in_logs,
    records,
    start_run,
    stop_run,
    stop_workers,
    wait_for,
    worker_env,
)
from tests.support.private_cluster import PrivateCluster, cluster_fixture

pytestmark = pytest.mark.slow
__all__ = ["cluster_fixture"]  # the fixture, used by name

UPDATES = 45  # the job's target: --max-updates
DELAY = "0.3"  # seconds each worker sleeps after a task: the job's pace does not follow the load
DOWN_SECONDS = 8.0  # how long a killed node stays down before it is started again (at most)


def applied(out: Path) -> list[dict[str, object]]:
    return [r for r in records(out / "ledger.jsonl") if r["fate"] == "applied"]


def progress(out: Path, before: int, seconds: float = DOWN_SECONDS) -> int:
    """Updates applied within ``seconds`` after ``before`` were (RabbitMQ 3.10.8 may hold some
    publishes while a node is down: the test measures, it does not require)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(applied(out)) < before + 6:
        time.sleep(0.2)
    return len(applied(out)) - before


def node_of_workers(cluster: PrivateCluster) -> dict[str, int]:
    """Each worker's connection (by name) and the index of the node it is connected to (its port)."""
    ports = {node.port: i for i, node in enumerate(cluster.nodes)}
    return {
        name: ports[port]
        for name, (_, _, port) in cluster.any_running().connections().items()
        if name.startswith("fedq-worker-")
    }


@pytest.mark.timeout(420)
def test_job_survives_two_node_kills(tmp_path: Path, cluster: PrivateCluster) -> None:
    cluster.start()  # whatever an earlier test left down
    out = tmp_path / "run"
    names = Names(f"t-{uuid.uuid4().hex[:10]}")
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "1",
        "--min-workers",
        "3",  # the first task once the two workers started beside the run have said hello too
        "--delay-profile",
        f"{DELAY}*1",
        "--buffer",
        "3",
        "--target-accuracy",
        "0",
        "--max-updates",
        str(UPDATES),
        "--max-seconds",
        "240",
        "--broker-users",
        "off",  # guest on every node: the management API is not what this test is about
        amqp_url=cluster.amqp_url,
    )
    extra: list[subprocess.Popen[bytes]] = []
    steps: list[str] = []
    try:
        wait_for(lambda: (out / "keys" / "trusted").is_dir() and (out / "config.json").exists(), 120, "the run's keys", proc)
        job = Names(names.namespace, json.loads((out / "config.json").read_text())["settings"]["job"])
        for i in (1, 2):  # a worker on node 1 and one on node 2
            key = enrol(out / "keys", f"worker-n{i}")
            args = ("--worker-id", f"n{i}", "--partition", f"{i}/3", "--key-file", str(key), "--delay", DELAY)
            with (tmp_path / f"n{i}.log").open("wb") as log:
                extra.append(
                    subprocess.Popen(
                        fedq("worker", *args, "--amqp-url", cluster.amqp_url, "--amqp-first", str(i)),
                        env=worker_env(names, out),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        wait_for(lambda: len(applied(out)) >= 6, 120, "the job's first versions", proc)
        coordinator = run_pids(out)["coordinator"]
        os.kill(coordinator, signal.SIGSTOP)  # no new task while rabbitmqctl looks (seconds each, loaded)
        try:
            # the workers are spread over the nodes, and every queue and stream of the job on all three
            spread = node_of_workers(cluster)
            members = {q: m for q, m in cluster.members().items() if q.startswith(f"{names.namespace}.")}
        finally:
            os.kill(coordinator, signal.SIGCONT)
        assert sorted(spread.values()) == [0, 1, 2], spread
        everywhere = {n.node for n in cluster.nodes}
        for queue in (job.task_queue("cpu"), job.updates_queue, job.update_log):
            assert queue in members, sorted(members)
        assert {q: m[1] for q, m in members.items()} == {q: everywhere for q in members}, members

        counts = [len(applied(out))]
        steps.append(f"node 0 killed at {counts[-1]} applied")
        cluster.kill(0)
        steps.append(f"{progress(out, counts[-1])} applied while node 0 was down")
        os.kill(coordinator, signal.SIGSTOP)  # no new task while node 0 comes back: the job cannot end
        try:
            started = time.monotonic()
            cluster.restart(0)
            cluster.wait_members(list(members))
            steps.append(f"node 0 back with every member online after {time.monotonic() - started:.1f}s")
        finally:
            os.kill(coordinator, signal.SIGCONT)
        counts.append(len(applied(out)))
        assert counts[-1] < UPDATES - 10, f"the job is nearly done before the second kill: {steps}"
        steps.append(f"node 1 killed at {counts[-1]} applied")
        cluster.kill(1)
        steps.append(f"{progress(out, counts[-1])} applied while node 1 was down")
        restarting = threading.Thread(target=cluster.restart, args=(1,), daemon=True)
        restarting.start()  # the job goes on meanwhile, and ends whenever it reaches its target
        output = finish(proc, 240, check=False)
        code = proc.returncode
    finally:
        stop_run(proc)
        lingering = stop_workers(extra)
    context = f"{steps}\n--- fedq run (tail) ---\n{output[-2500:]}\n--- problems ---\n{problems_in_logs(out)}"
    assert code == 0, context
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates", (summary, context)
    ledger = check_exact_accounting(out)
    assert len(ledger) >= UPDATES
    done = applied(out)
    assert len(done) > counts[-1] + 5, f"too little applied after the second kill: {steps}"
    by_worker = Counter(str(r["worker_id"]) for r in done)
    assert all(by_worker[w] > 0 for w in ("w00", "n1", "n2")), by_worker
    # the run's own audit, made as it ended, right after the second kill
    ran = json.loads((out / "audit.json").read_text())
    assert ran["ok"] and ran["lost"] == 0 and ran["applied_twice"] == {}, ran
    # again, the workers beside the run stopped too: every applied update is in the update log
    assert_balanced(out, audit(out, "--amqp-url", cluster.amqp_url))
    assert not lingering, lingering
    restarting.join(120)  # node 1 came back while the job ended and the audits read
    assert cluster.nodes[1].running
    print("cluster job:", "; ".join(steps))  # pytest -s shows what the kills cost
