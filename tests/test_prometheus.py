"""A real Prometheus (Debian's ``prometheus``; scripts/bootstrap --tests installs it) scrapes a live ``fedq run
--metrics-port`` job every second; its HTTP API then holds fedq's series from every role."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from fedq.dashboard.server import start as start_dashboard
from fedq.run import run_pids
from shared.settings import Settings
from tests.support.jobs import TINY_APP, cleanup, cli, start_run, wait_for

__all__ = ["cleanup"]  # the fixture, re-exported for this test

PROMETHEUS = "/usr/bin/prometheus"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # git-ignored
PROCESSES = ("aggregator", "coordinator", "w00", "w01")  # the order fedq run starts them in


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError(f"no {count} consecutive free ports")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Prometheus of this test's own (config, storage and port under ``tmp_path``) scraping, every
    second, the ports a run with ``--metrics-port base`` will use; its URL and that base."""
    binary = shutil.which("prometheus") or PROMETHEUS
    if not Path(binary).exists():
        pytest.fail(f"{PROMETHEUS} is missing: apt-get install prometheus (scripts/bootstrap --tests does)", pytrace=False)
    base = free_ports(1 + len(PROCESSES))
    web = free_ports(1)
    config = tmp_path / "prometheus.yml"
    targets = [f"127.0.0.1:{base + i}" for i in range(1 + len(PROCESSES))]
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "fedq", "honor_labels": True, "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{web}"
    try:
        wait_for(lambda: _ready(url) or proc.poll() is not None, 20, "prometheus to start")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        yield url, base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector ``promql`` evaluates to now."""
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=5
    ) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def chromium(tmp_path: Path, url: str, *what: str) -> str:
    """Headless Chromium (Debian's ``chromium``; scripts/bootstrap --tests installs it) loads ``url``, runs its
    scripts for up to 3 s of virtual time and does ``what`` (--dump-dom: its stdout is the DOM)."""
    binary = shutil.which("chromium") or CHROMIUM
    if not Path(binary).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap --tests does)", pytrace=False)
    ran = subprocess.run(
        [
            binary,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=3000",
            "--window-size=1280,1600",
            *what,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    return ran.stdout


def test_prometheus_scrapes_every_role_of_a_live_job(
    tmp_path: Path, names: Names, cleanup: None, prometheus: tuple[str, int]
) -> None:
    url, base = prometheus
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers",
        "2",
        "--buffer",
        "2",
        "--target-accuracy",
        "0",
        "--max-seconds",
        "60",
        "--delay-profile",
        "0.2*2",
        "--metrics-port",
        str(base),
        "--broker-users",
        "off",  # nothing to leave behind when the run is killed
    )
    try:
        wait_for(lambda: (out / "config.json").exists(), 30, "the run's config", proc)
        job = json.loads((out / "config.json").read_text())["settings"]["job"]
        # Every series asked for, each from the role that exports it; scraped at least once, live.
        wanted = {
            "aggregator: updates accepted": f'fedq_updates_accepted_total{{job="{job}"}} > 0',
            "aggregator: versions made": f'fedq_versions_total{{job="{job}"}} > 1',
            "aggregator: current version": f'fedq_version{{job="{job}",role="aggregator"}} > 1',
            "aggregator: staleness": f'fedq_update_staleness_count{{job="{job}"}} > 0',
            "aggregator: latency": f'fedq_update_latency_seconds_count{{job="{job}"}} > 0',
            "workers: training seconds": f'count(fedq_training_seconds_count{{job="{job}"}} > 0) == 2',
            "workers: bytes out": f'count(fedq_sent_bytes_total{{job="{job}",role="worker"}} > 0) == 2',
            "coordinator: accuracy": f'fedq_test_accuracy{{job="{job}"}} >= 0',
            "coordinator: version adopted": f'fedq_version{{job="{job}",role="coordinator"}} > 0',
            "coordinator: live workers": f'fedq_workers_live{{job="{job}",capability="cpu"}} == 2',
            "coordinator: tasks issued": f'fedq_tasks_issued_total{{job="{job}",capability="cpu"}} > 0',
            "coordinator: queue depth": f'fedq_queue_depth{{job="{job}",capability="cpu"}} >= 0',
            "every process: its start": "count(fedq_service_starts_total) == 5",
        }
        missing = dict(wanted)

        def seen() -> bool:
            for what, promql in list(missing.items()):
                if query(url, promql):
                    del missing[what]

            return not missing

        try:
            wait_for(seen, 60, "fedq's series in prometheus", proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still missing: {missing}") from None
        # fedq status --once --json on the same live job (in this process: no start-up to pay)
        status = cli("status", out, "--once", "--json")
        assert status.returncode == 0, status.stderr
        snap = json.loads(status.stdout)
        job_names = Names(names.namespace, job)
        assert [(q["name"], q["capability"]) for q in snap["queues"]] == [
            (job_names.task_queue("cpu"), "cpu"),
            (job_names.updates_queue, None),
        ], snap["queues"]
        assert all(q["messages"] is not None and q["consumers"] for q in snap["queues"]), snap
        assert snap["workers"]["live"] == ["w00", "w01"] and snap["version"]["latest"] >= 1, snap
        listed = json.loads((out / "processes.json").read_text())
        assert {name: entry["metrics_port"] for name, entry in listed.items()} == {
            name: base + 1 + i for i, name in enumerate(PROCESSES)
        }
        starts = sorted(
            (s["metric"]["role"], s["metric"]["instance"]) for s in query(url, "fedq_service_starts_total")
        )
        assert starts == [  # a start from each of the five processes, each on its own port
            ("aggregator", f"127.0.0.1:{base + 1}"),
            ("coordinator", f"127.0.0.1:{base + 2}"),
            ("run", f"127.0.0.1:{base}"),
            ("worker", f"127.0.0.1:{base + 3}"),
            ("worker", f"127.0.0.1:{base + 4}"),
        ]
        # fedq dashboard on the same live job, loaded by a real browser: its accuracy charts hold
        # the job's evaluated versions, point for point as metrics.jsonl has them
        dashboard = start_dashboard(str(out), Settings.from_env(), port=0)
        try:
            dom = chromium(tmp_path, dashboard.url, "--dump-dom")
            ARTIFACTS.mkdir(exist_ok=True)
            chromium(tmp_path, dashboard.url, f"--screenshot={ARTIFACTS / 'dashboard-live-job.png'}")
        finally:
            dashboard.close()
        assert 'id="state" class="live"' in dom, dom[:2000]
        evaluated = {
            m["version"]: m["accuracy"]
            for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        }
        for chart in ("acc-time", "acc-version"):
            svg = re.search(rf'<svg[^>]*class="chart accuracy {chart}".*?</svg>', dom, re.S)
            assert svg, f"no {chart} chart in the page: {dom[:2000]}"
            points = {
                int(v): float(a)
                for v, a in re.findall(r'data-version="(\d+)" data-accuracy="([^"]+)"', svg.group(0))
            }
            assert len(points) >= 2 and max(points) >= 1, points
            assert points == {v: evaluated[v] for v in points}, (points, evaluated)
        assert re.search(
            rf'<td>{re.escape(names.namespace)}\.job\.{job}\.tasks\.cpu</td><td>tasks cpu</td><td class="num">\d+</td><td class="num">2</td>',
            dom,
        ), dom
        assert dom.count('data-status="live"') == 2  # w00 and w01 in the participation chart
        assert (ARTIFACTS / "dashboard-live-job.png").stat().st_size > 10_000
    finally:
        # Killed, not stopped: a graceful stop (its processes' goodbyes, the summary, the audit)
        # is tested elsewhere and costs seconds here. The run first, so that it restarts nothing.
        proc.kill()
        proc.wait()
        with contextlib.suppress(OSError, ValueError):
            for pid in run_pids(out).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
