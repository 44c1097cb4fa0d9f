"""``fedq dashboard`` and ``fedq report`` without a broker: the data function on synthetic records,
the token check, the server's routes and the report being one self-contained file. (The page in a
real browser during a live job: tests/test_prometheus.py.)"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fedq import cost
from fedq.dashboard import page
from fedq.dashboard.data import Process, QueueLook, Queues, RunRecords, size_histogram, snapshot
from fedq.dashboard.server import Dashboard, Running, authorized, host_allowed, needs_token, token_for
from tests.support.jobs import cli

NOW = 1_000_000.0


def update(worker: str, fate: str, version: int, **extra: Any) -> dict[str, Any]:
    return {"worker_id": worker, "fate": fate, "version": version, "bytes": 1000, "staleness": 0, **extra}


LEDGER = (
    update("w1", "applied", 1, staleness=0, num_samples=10, task_id="a", digest="d1"),
    update("w2", "applied", 1, staleness=1, num_samples=20, task_id="b", digest="d2", bytes=3000),
    update("w1", "applied", 2, staleness=1, num_samples=10, task_id="c", digest="d3"),
    update("w2", "rejected", 2, reason="stale", task_id="d", digest="d4"),
    update("w3", "rejected", 2, reason="bad_signature", task_id="e", digest="d5"),
    update("w3", "rejected", 2, reason="stale", task_id="f", digest="d6"),
    update("w1", "pending", 2, task_id="g", digest="d7"),
    {"fate": "rollback", "version": 3},  # not an update: counted nowhere
)
METRICS = (
    {"version": 0, "accuracy": 0.1, "t": 0.0, "updates_total": 0},
    {"version": 1, "accuracy": 0.5, "t": 2.5, "updates_total": 2},
    {"version": 2, "accuracy": 0.75, "t": 4.0, "updates_total": 3, "dp_epsilon": 1.5},
    {"version": 2, "accuracy": float("nan"), "t": 4.0},  # not finite: left out
)


def records(live: bool = True) -> RunRecords:
    state = {
        "workers_seen": ["w1", "w2"],  # the coordinator's registry: w3 stopped its heartbeats
        "workers": {"w1": {"received": 4}, "w2": {"received": 2}, "w3": {"received": 2}},
        "stopped": NOW - 1,
        "mode": "async",
        "latest_version": 2,
    }
    return RunRecords(
        run="/runs/r",
        job="j",
        metrics=METRICS,
        ledger=LEDGER,
        coordinator=state,
        processes=(
            Process("aggregator", 10, True, 9001),
            Process("coordinator", 11, True),
            Process("w1", 12, True),
            Process("w2", 13, False),  # its process died: gone, though the registry still holds it
        ),
        cost=cost.Records(ledger=LEDGER, task_counts={"w3": {"expired": 2}}, orgs={"w1": "clinic-a"}),
        queues=Queues("passive declares", (QueueLook("ns.job.j.tasks.cpu", "tasks cpu", 3, 2),), at=NOW - 2),
        ledger_mtime=NOW - 30,
        live=live,
    )


def test_snapshot_holds_every_view_from_the_records() -> None:
    d = snapshot(records(), NOW)
    assert [(p["version"], p["accuracy"], p["t"]) for p in d["accuracy"]] == [
        (0, 0.1, 0.0),
        (1, 0.5, 2.5),
        (2, 0.75, 4.0),
    ]
    assert d["accuracy"][2]["dp_epsilon"] == 1.5
    by_worker = {w["worker"]: w for w in d["participation"]}
    assert {w: (v["applied"], v["rejected"], v["pending"], v["status"]) for w, v in by_worker.items()} == {
        "w1": (2, 0, 1, "live"),
        "w2": (1, 1, 0, "gone"),
        "w3": (0, 2, 0, "gone"),
    }
    assert by_worker["w1"]["org"] == "clinic-a" and by_worker["w1"]["samples"] == 20
    assert d["staleness"] == [{"staleness": 0, "count": 1}, {"staleness": 1, "count": 2}]
    assert d["rejections"] == [{"reason": "stale", "count": 2}, {"reason": "bad_signature", "count": 1}]
    assert d["update_sizes"]["count"] == 7 and sum(b["count"] for b in d["update_sizes"]["bins"]) == 7
    assert d["queues"]["rows"] == [
        {"queue": "ns.job.j.tasks.cpu", "role": "tasks cpu", "messages": 3, "consumers": 2}
    ]
    health = {s["name"]: (s["health"], s["age"]) for s in d["services"]}
    assert health == {
        "aggregator": ("quiet", 30.0),
        "coordinator": ("up", 1.0),
        "w1": ("up", None),
        "w2": ("down", None),
    }
    h = d["headline"]
    assert (h["version"], h["accuracy"], h["best_accuracy"], h["updates_applied"], h["updates_rejected"]) == (
        2,
        0.75,
        0.75,
        3,
        3,
    )
    assert (h["workers_live"], h["workers_gone"]) == (1, 2)
    table = d["cost"]
    rows = {r[0]: dict(zip(table["keys"], r, strict=True)) for r in table["rows"]}
    assert rows["total"]["updates_applied"] == 3 and rows["w3"]["tasks_expired"] == 2
    json.dumps(d, allow_nan=False)  # the page's document is plain JSON


def test_one_message_one_fate_in_every_view() -> None:
    ledger = (
        update("w1", "pending", 1, task_id="a", digest="m1", bytes=40),  # held at a clean stop
        update("w1", "applied", 1, task_id="a", digest="m1", bytes=5000, num_samples=10),  # after the restart
        update("w1", "rejected", 1, reason="duplicate", task_id="a", digest="m1", bytes=5000),
        update("w2", "rejected", 1, reason="stale", task_id="b", digest="m2", bytes=300),  # parked, delivered twice
        update("w2", "rejected", 1, reason="stale", task_id="b", digest="m2", bytes=300),
    )
    d = snapshot(RunRecords(run="/runs/r", job="j", ledger=ledger, cost=cost.Records(ledger=ledger)), NOW)
    by_worker = {w["worker"]: (w["applied"], w["rejected"], w["pending"], w["samples"]) for w in d["participation"]}
    assert by_worker == {"w1": (1, 0, 0, 10), "w2": (0, 1, 0, 0)}
    assert (d["headline"]["updates_applied"], d["headline"]["updates_rejected"]) == (1, 1)
    assert d["rejections"] == [{"reason": "stale", "count": 1}]
    assert (d["update_sizes"]["count"], d["update_sizes"]["mean"]) == (2, 2650.0)  # the applied record's bytes
    rows = {r[0]: dict(zip(d["cost"]["keys"], r, strict=True)) for r in d["cost"]["rows"]}
    assert (rows["total"]["updates_applied"], rows["total"]["updates_rejected"], rows["total"]["bytes_up"]) == (1, 1, 5300)


def test_no_number_that_is_not_finite_reaches_the_document() -> None:
    state = {"latest_version": float("nan"), "mode": float("inf")}
    d = snapshot(RunRecords(run="/runs/r", job="j", coordinator=state, queues=Queues("x", at=float("-inf"))), NOW)
    assert (d["headline"]["version"], d["headline"]["mode"], d["queues"]["at"]) == (None, None, None)
    json.dumps(d, allow_nan=False)


def test_a_finished_run_shows_no_live_worker_and_services_finished() -> None:
    d = snapshot(records(live=False), NOW)
    assert {w["status"] for w in d["participation"]} == {"gone"}
    assert {s["health"] for s in d["services"]} == {"finished"}


def test_size_histogram() -> None:
    assert size_histogram([]) == []
    assert size_histogram([5, 5]) == [{"lo": 5, "hi": 5, "count": 2}]
    bins = size_histogram([0, 5, 100], bins=10)
    assert len(bins) == 10 and bins[0]["count"] == 2 and bins[-1]["count"] == 1


def test_token_check() -> None:
    assert not needs_token("127.0.0.1") and not needs_token("localhost") and needs_token("0.0.0.0")
    assert token_for("127.0.0.1", None) is None and token_for("127.0.0.1", "t") == "t"
    made = token_for("0.0.0.0", None)
    assert made and len(made) >= 20 and made != token_for("0.0.0.0", None)
    assert authorized(None, "/", {})
    assert authorized("s3cret", "/?token=s3cret", {})
    assert authorized("s3cret", "/api/data", {"Authorization": "Bearer s3cret"})
    assert not authorized("s3cret", "/", {})
    assert not authorized("s3cret", "/?token=wrong", {"Authorization": "Bearer nope"})


def run_folder(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"settings": {"job": "j", "store": str(run / "store")}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS[:3]))
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LEDGER))
    (run / "coordinator.json").write_text(json.dumps({"workers_seen": ["w1"], "stop_reason": "target"}))
    return run


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_server_asks_for_its_token(tmp_path: Path) -> None:
    running = Running(Dashboard(run_folder(tmp_path), token="tok"), "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{running.port}"
        assert running.url == f"{base}/?token=tok"
        assert get(f"{base}/")[0] == 401 and get(f"{base}/api/data")[0] == 401
        status, body = get(running.url)
        assert status == 200 and b"<svg" not in body and b"fedq-data" in body
        status, body = get(f"{base}/api/data", {"Authorization": "Bearer tok"})
        assert status == 200 and [p["version"] for p in json.loads(body)["accuracy"]] == [0, 1, 2]
        assert get(f"{base}/nothing?token=tok")[0] == 404
    finally:
        running.close()


def test_the_loopback_dashboard_answers_to_loopback_names_only(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.0.0.1:8642", "localhost", "LOCALHOST:1", "[::1]", "[::1]:8642"):
        assert host_allowed("127.0.0.1", host), host
    for host in ("evil.example", "evil.example:8642", "127.0.0.1.evil.example", "localhost:x", "::1", "", None):
        assert not host_allowed("127.0.0.1", host), host
    assert host_allowed("0.0.0.0", "evil.example")  # bound beyond the loopback, the token guards it
    running = Running(Dashboard(run_folder(tmp_path)), "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{running.port}"
        assert get(f"{base}/api/data")[0] == 200
        assert get(f"{base}/api/data", {"Host": f"localhost:{running.port}"})[0] == 200
        assert get(f"{base}/api/data", {"Host": f"rebound.example:{running.port}"})[0] == 403
        assert get(f"{base}/", {"Host": "rebound.example"})[0] == 403
    finally:
        running.close()


def test_report_is_one_self_contained_file(tmp_path: Path) -> None:
    run = run_folder(tmp_path)
    out = tmp_path / "report.html"
    ran = cli("report", run, "-o", out)
    assert ran.returncode == 0, ran.stderr
    html = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I), "fetches from the network"
    assert not re.search(r"<(script|link|img)[^>]*(src|href)=", html, re.I), "loads another file"
    assert "@import" not in html and "url(" not in html
    inlined = re.search(r'<script id="fedq-data" type="application/json">(.*?)</script>', html, re.S)
    assert inlined
    data = json.loads(inlined.group(1))
    assert [p["accuracy"] for p in data["accuracy"]] == [0.1, 0.5, 0.75] and not data["live"]
    assert "function lineChart" in html  # the charts' code is inside


def test_inlined_data_cannot_close_its_script() -> None:
    html = page.render({"reason": "</script><script>alert(1)</script>"})
    assert html.count("</script>") == 2  # the data's element and the code's, nothing more


def test_report_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    ran = cli("report", tmp_path, "-o", tmp_path / "r.html")
    assert ran.returncode != 0 and "not a fedq run folder" in ran.stderr
    with pytest.raises(OSError):
        (tmp_path / "r.html").stat()
