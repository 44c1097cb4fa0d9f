"""Prometheus metrics (shared/metrics.py) without a broker: what each service's events move, on the
in-memory transport; the endpoint; fedq run's ports and processes.json. A real Prometheus scraping
a live job is tests/test_prometheus.py.

Metrics live in the process's one registry, shared by every test: each test reads differences."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from fedq.run import Launcher, check_metrics_ports, run_pids
from shared import metrics
from shared.errors import ConfigError
from shared.messages import Update
from shared.settings import Settings
from shared.transport.memory import MemoryTransport
from tests.support.messages import JOB
from tests.support.rigs import aggregator_rig, coordinator_rig, worker_rig
from tests.support.waiting import until
from worker.decision import Decision

__all__ = ["JOB"]  # the names fixture's job (every rig here is of it)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_importing_the_module_opens_nothing_and_names_what_it_exports() -> None:
    # no server, no thread: importing it listens on nothing (the child fails on a broken assert)
    code = "import shared.metrics as m, threading; assert not m.serving(); assert threading.active_count() == 1"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    names = metrics.exported_names()
    assert {"fedq_updates_accepted_total", "fedq_update_staleness_bucket", "fedq_version"} <= names
    assert all(n.startswith("fedq_") for n in names)


def test_the_endpoint_serves_every_metric_on_127_0_0_1() -> None:
    port = free_port()
    metrics.serve(port, "test")
    metrics.serve(port, "test")  # once per port, however often asked
    assert metrics.serving()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'fedq_service_starts_total{role="test"} 2.0' in text
    assert "# TYPE fedq_update_latency_seconds histogram" in text


async def test_the_aggregator_counts_applied_and_rejected_updates_and_versions(
    mem: MemoryTransport, names: object, tmp_path: Path
) -> None:
    before = {
        "accepted": value("fedq_updates_accepted_total", job=JOB),
        "rejected": value("fedq_updates_rejected_total", job=JOB, reason="undecodable"),
        "versions": value("fedq_versions_total", job=JOB),
        "staleness": value("fedq_update_staleness_count", job=JOB),
        "latency": value("fedq_update_latency_seconds_count", job=JOB),
        "in": value("fedq_received_bytes_total", job=JOB, role="aggregator"),
        "out": value("fedq_sent_bytes_total", job=JOB, role="aggregator"),
    }
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:  # type: ignore[arg-type]
        await rig.send(b"garbage")
        await rig.rejected(b"garbage", "undecodable")
        sizes = 0
        for _ in range(2):
            _, body = rig.update()
            sizes += len(body)
            await rig.send(body)
        await rig.wait_version(1)
        await rig.stop_and_assert_all_acked()
    assert value("fedq_updates_accepted_total", job=JOB) - before["accepted"] == 2
    assert value("fedq_updates_rejected_total", job=JOB, reason="undecodable") - before["rejected"] == 1
    assert value("fedq_versions_total", job=JOB) - before["versions"] == 1
    assert value("fedq_version", job=JOB, role="aggregator") == 1
    assert value("fedq_update_staleness_count", job=JOB) - before["staleness"] == 2
    assert value("fedq_update_latency_seconds_count", job=JOB) - before["latency"] == 2
    assert value("fedq_received_bytes_total", job=JOB, role="aggregator") - before["in"] >= sizes
    assert value("fedq_sent_bytes_total", job=JOB, role="aggregator") > before["out"]


async def test_the_worker_counts_its_training_and_bytes(mem: MemoryTransport, tmp_path: Path) -> None:
    job = mem.names.job
    trained = value("fedq_training_seconds_count", job=job)
    sent = value("fedq_sent_bytes_total", job=job, role="worker")
    received = value("fedq_received_bytes_total", job=job, role="worker")
    async with worker_rig(mem, tmp_path) as r:
        task, body = r.task()
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.TRAIN
        update, raw = await r.next_update()
        assert isinstance(update, Update)
    assert value("fedq_training_seconds_count", job=job) - trained == 1
    assert value("fedq_sent_bytes_total", job=job, role="worker") - sent == len(raw)
    assert value("fedq_received_bytes_total", job=job, role="worker") - received == len(body)


async def test_the_coordinator_sets_its_fleet_queue_version_and_accuracy_gauges(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    job = mem.names.job
    issued = value("fedq_tasks_issued_total", job=job, capability="cpu")
    async with coordinator_rig(mem, tmp_path, max_versions=1) as r:
        await r.hello("w1")
        await until(lambda: r.tasks, "a task for the worker")
        r.coordinator.observe_fleet(time.time())
        assert value("fedq_tasks_in_flight", job=job, capability="cpu") == 1
        assert value("fedq_workers_live", job=job, capability="cpu") == 1
        await r.coordinator.observe_queues()  # the rig's consumer took the task at once
        assert value("fedq_queue_depth", job=job, capability="cpu") == 0
        assert value("fedq_queue_consumers", job=job, capability="cpu") == 1
        await until(
            lambda: (
                value("fedq_evaluated_version", job=job) == 0 and value("fedq_test_accuracy", job=job) > 0
            ),
            "v0 evaluated",
        )
        await r.version(1, (r.tasks[0].task_id,))
        await r.running
    assert value("fedq_tasks_issued_total", job=job, capability="cpu") - issued == 1
    assert value("fedq_version", job=job, role="coordinator") == 1
    assert value("fedq_evaluated_version", job=job) == 1


def test_fleet_gauges_turn_the_workers_running_totals_into_a_counter() -> None:
    gauges = metrics.FleetGauges("fleet-job", ("cpu", "gpu"))
    gauges.observe({"cpu": 2}, {"cpu": 3, "gpu": 1}, redelivered=4)
    gauges.observe({}, {}, redelivered=3)  # a worker forgotten: never a counter going back
    gauges.observe({}, {}, redelivered=6)
    assert value("fedq_tasks_redelivered_total", job="fleet-job") == 6
    assert value("fedq_tasks_in_flight", job="fleet-job", capability="gpu") == 0
    assert value("fedq_workers_live", job="fleet-job", capability="cpu") == 0


def test_fedq_run_gives_each_process_its_own_port_and_lists_it(tmp_path: Path) -> None:
    launcher = Launcher(Settings(metrics_port=9300, job="ports"), tmp_path, tmp_path / "keys")
    assert "FEDQ_METRICS_PORT" not in launcher.env  # each process gets its own by flag
    assert [launcher.metrics_port(n) for n in ("aggregator", "coordinator", "w00", "aggregator")] == [
        9301,
        9302,
        9303,
        9301,
    ]
    launcher.procs = {"aggregator": subprocess.Popen(["true"])}  # type: ignore[dict-item]
    launcher.procs["aggregator"].wait()
    launcher.write_pids()
    listed = (tmp_path / "processes.json").read_text()
    pid = launcher.procs["aggregator"].pid
    assert run_pids(tmp_path) == {"aggregator": pid}
    assert '"metrics_port": 9301' in listed
    off = Launcher(Settings(), tmp_path / "off", tmp_path / "keys")
    assert off.metrics_port("aggregator") == 0


def test_a_port_out_of_range_is_a_clear_error_and_a_nonsense_latency_is_left_out() -> None:
    for port in (-1, 70000):
        with pytest.raises(ConfigError, match="--metrics-port"):
            metrics.serve(port, "test")
    with pytest.raises(ConfigError, match="1-65535"):
        check_metrics_ports(65530, 10)
    check_metrics_ports(0, 10)  # off
    before = value("fedq_update_latency_seconds_count", job="clock")
    total = value("fedq_update_latency_seconds_sum", job="clock")
    for sent_at in (-math.inf, math.nan, 2e9, -1e300):  # a worker's clock or word
        metrics.applied("clock", 0, sent_at, 1_800_000_000.0)
    metrics.applied("clock", 0, 1_799_999_999.0, 1_800_000_000.0)
    assert value("fedq_update_latency_seconds_count", job="clock") - before == 1
    assert value("fedq_update_latency_seconds_sum", job="clock") - total == 1.0
