"""``fedq cost``: the table from synthetic records (pure, no broker), the command on a run folder, the
price file's errors, ``--org`` on the wire; and one finished ``fedq run`` whose cost totals must equal
the sums in its ledger."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from fedq.cost import (
    STORE_ROW,
    TOTAL_ROW,
    By,
    PriceError,
    Prices,
    Records,
    StoredVersion,
    Usage,
    parse_prices,
    read_run,
    render,
    rows,
    summary_totals,
    totals,
)
from shared.codec import decode, encode
from shared.errors import ConfigError
from shared.ledger import claimed_costs, one_per_message, read_lines
from shared.messages import Hello, Update
from shared.settings import Settings
from shared.signing import Keyring, Role, Signer
from tests.support.jobs import cli
from worker.config import WorkerConfig

# Two workers of two orgs, a third seen only in hellos; one message delivered twice (digest "a":
# applied, then rejected as a duplicate), one held when an aggregator stopped and applied after, one
# unreadable message, a noise-seed record that is no update.
LEDGER: tuple[dict[str, Any], ...] = (
    {"fate": "applied", "task_id": "t1", "worker_id": "w1", "version": 1, "digest": "a", "bytes": 100, "num_samples": 10,
     "cpu_seconds": 1.5, "wall_seconds": 2.0, "bytes_down": 50, "org": "hosp-a"},
    {"fate": "rejected", "reason": "duplicate", "task_id": "t1", "worker_id": "w1", "digest": "a", "bytes": 100,
     "cpu_seconds": 1.5, "wall_seconds": 2.0, "bytes_down": 50, "org": "hosp-a"},
    {"fate": "applied", "task_id": "t2", "worker_id": "w2", "version": 1, "digest": "b", "bytes": 200, "num_samples": 20,
     "cpu_seconds": 3.0, "wall_seconds": 4.0, "bytes_down": 60},
    {"fate": "rejected", "reason": "stale", "task_id": "t3", "worker_id": "w2", "digest": "c", "bytes": 300,
     "cpu_seconds": 0.5, "wall_seconds": 1.0, "bytes_down": 70},
    {"fate": "rejected", "reason": "undecodable", "worker_id": "", "digest": "d", "bytes": 7},
    {"kind": "dp_noise", "version": 2, "noise_seed": 5},
    {"fate": "pending", "task_id": "t4", "worker_id": "w1", "digest": "e", "bytes": 110, "cpu_seconds": 2.0, "wall_seconds": 2.5,
     "bytes_down": 55, "org": "hosp-a"},
    {"fate": "applied", "task_id": "t4", "worker_id": "w1", "version": 2, "digest": "e", "bytes": 110, "num_samples": 11,
     "cpu_seconds": 2.0, "wall_seconds": 2.5, "bytes_down": 55, "org": "hosp-a"},
)
RECORDS = Records(
    ledger=LEDGER,
    task_counts={
        "w1": {"received": 4, "completed": 3, "expired": 1, "redelivered": 1},
        "w2": {"received": 2, "completed": 2, "expired": 0, "redelivered": 0},
        "w3": {"received": 2, "completed": 0, "expired": 2, "redelivered": 0},
    },
    orgs={"w2": "hosp-b", "w3": "hosp-a"},
    versions=(StoredVersion(0, 1000), StoredVersion(1, 1000, 200), StoredVersion(2, 1000)),
)
PRICES = Prices(cpu_hour=3.6, gb_transferred=1e6, gb_month_stored=2e6, months_stored=0.5, currency="EUR")


def by_key(by: By, prices: Prices | None = None) -> dict[str, Any]:
    return {r.key: r for r in rows(RECORDS, by, prices)}


def test_per_worker_rows_count_each_message_once() -> None:
    t = by_key(By.WORKER)
    w1 = t["w1"].usage
    assert (w1.updates_applied, w1.updates_rejected, w1.samples) == (2, 0, 21)  # "a"'s duplicate: one fate
    assert (w1.bytes_up, w1.bytes_down) == (210, 105)  # "a" once, "e" once
    assert math.isclose(w1.cpu_seconds, 3.5) and math.isclose(w1.wall_seconds, 4.5)
    assert (w1.tasks_done, w1.tasks_expired, w1.tasks_redelivered) == (2, 1, 1)  # t1 and t4, from the ledger
    assert t["w1"].org == "hosp-a" and t["w2"].org == "hosp-b" and t["w3"].org == "hosp-a"
    w2 = t["w2"].usage
    assert (w2.updates_applied, w2.updates_rejected, w2.bytes_up, w2.samples) == (1, 1, 500, 20)
    assert (w2.tasks_done, w2.cpu_seconds, w2.wall_seconds, w2.bytes_down) == (1, 3.0, 4.0, 60)  # not t3's claims
    assert t["w3"].usage == Usage(tasks_expired=2)
    assert t["-"].usage == Usage(updates_rejected=1, bytes_up=7)  # no sender to name
    assert t[STORE_ROW].usage == Usage(store_bytes=3200)


def test_every_view_adds_up_to_the_same_total() -> None:
    total = totals(RECORDS)
    assert (total.updates_applied, total.updates_rejected, total.bytes_up, total.store_bytes) == (3, 2, 717, 3200)
    for by in By:
        table = rows(RECORDS, by)
        assert table[-1].key == TOTAL_ROW and table[-1].usage == total, by
        summed = Usage()
        for r in table[:-1]:
            summed.add(r.usage)
        assert summed == total, by


def test_per_org_and_per_version() -> None:
    orgs = by_key(By.ORG)
    assert set(orgs) == {"hosp-a", "hosp-b", "-", STORE_ROW, TOTAL_ROW}
    assert orgs["hosp-a"].usage.tasks_expired == 3  # w1 and w3, whose org only its hellos named
    assert orgs["hosp-b"].usage.samples == 20
    versions = by_key(By.VERSION)
    assert versions["v0"].usage == Usage(store_bytes=1000)
    assert versions["v1"].usage.store_bytes == 1200 and versions["v1"].usage.updates_applied == 2
    assert versions["v2"].usage.samples == 11
    assert versions["-"].usage.updates_rejected == 2 and versions["-"].usage.tasks_done == 0  # t3 was rejected
    assert versions["-"].usage.tasks_expired == 3
    assert (versions["v1"].usage.tasks_done, versions["v2"].usage.tasks_done) == (2, 1)


def test_prices_add_a_cost_column() -> None:
    t = by_key(By.WORKER, PRICES)
    # 3.5 CPU-seconds at 3.6 an hour; 315 bytes at 1e6 a GB
    assert math.isclose(t["w1"].cost, 3.5 / 3600 * 3.6 + 315 / 1e9 * 1e6)
    assert math.isclose(t[STORE_ROW].cost, 3200 / 1e9 * 2e6 * 0.5)
    assert math.isclose(t[TOTAL_ROW].cost, sum(r.cost for k, r in t.items() if k != TOTAL_ROW))
    assert all(r.cost is None for r in rows(RECORDS, By.WORKER))


def test_render_table_and_csv() -> None:
    text = render(rows(RECORDS, By.WORKER, PRICES), By.WORKER, PRICES)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["worker", "org", "tasks"] and lines[0].split()[-1] == "EUR"
    assert lines[-1].startswith("total") and set(lines[-2]) <= {"-", " "}
    assert "3.2 kB" in lines[-1]
    csv_text = render(rows(RECORDS, By.ORG, PRICES), By.ORG, PRICES, csv_out=True)
    head, *body = [line.split(",") for line in csv_text.splitlines()]
    assert head[0] == "org" and head[-1] == "cost_EUR" and len(body) == 5
    total = dict(zip(head, body[-1], strict=True))
    assert total["bytes_up"] == "717" and total["store_bytes"] == "3200" and total["updates_rejected"] == "2"


def test_a_claimed_org_cannot_write_to_the_terminal() -> None:
    records = Records(ledger=({"fate": "applied", "worker_id": "w9\x1b[2J", "version": 1, "org": "\x1b[2Jx"},))
    text = render(rows(records, By.ORG), By.ORG)
    assert "\x1b" not in text and "2Jx" not in text  # an org that fails check_org is none
    text = render(rows(records, By.WORKER), By.WORKER)
    assert "\x1b" not in text and "w9\\x1b[2J" in text


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("cpu_hour = -1", "'cpu_hour'"),
        ("gb_transferred = 'cheap'", "'gb_transferred'"),
        ("gb_month_stored = true", "'gb_month_stored'"),
        ("cpu_hours = 1", "'cpu_hours'"),
        ("currency = 3", "'currency'"),
        ("months_stored = nan", "'months_stored'"),
        ("cpu_hour = ", "not TOML"),
    ],
)
def test_a_bad_price_file_names_the_key(text: str, named: str) -> None:
    with pytest.raises(PriceError, match=named) as caught:
        parse_prices(text, "p.toml")
    assert "p.toml" in str(caught.value) and isinstance(caught.value, ConfigError)


def test_a_price_file() -> None:
    p = parse_prices('cpu_hour = 0.05\ngb_transferred = 0.09\ngb_month_stored = 0.023\ncurrency = "EUR"\n')
    assert p == Prices(0.05, 0.09, 0.023, 1.0, "EUR")
    assert parse_prices("") == Prices()


def write_run(folder: Path, records: Records = RECORDS) -> Path:
    """A run folder as fedq run leaves it, as far as fedq cost reads it."""
    folder.mkdir()
    (folder / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.ledger))
    state = {"workers": records.task_counts, "orgs": records.orgs}
    (folder / "coordinator.json").write_text(json.dumps(state))
    models = folder / "store" / "jobs" / "j1" / "models"
    models.mkdir(parents=True)
    for v in records.versions:
        policy = {"server_state": {"size": v.state_bytes, "sha256": "0"}} if v.state_bytes else {}
        (models / f"v{v.version:06d}.json").write_text(json.dumps({"version": v.version, "size": v.model_bytes, "policy": policy}))
    settings = {"job": "j1", "store": str(folder / "store")}
    (folder / "config.json").write_text(json.dumps({"settings": settings}))
    return folder


def test_read_run_gives_the_records(tmp_path: Path) -> None:
    got = read_run(write_run(tmp_path / "run"))
    assert got == RECORDS
    assert summary_totals(got)["store_bytes"] == 3200 and summary_totals(got)["orgs"] == ["hosp-a", "hosp-b"]


def test_the_command(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run")
    prices = tmp_path / "prices.toml"
    prices.write_text('cpu_hour = 3.6\ncurrency = "EUR"\n')
    ran = cli("cost", run_dir, "--by", "version", "--prices", prices, "--csv")
    out = ran.stdout.splitlines()
    assert ran.returncode == 0 and out[0].startswith("version,") and out[0].endswith(",cost_EUR")
    assert [line.split(",")[0] for line in out[1:]] == ["v0", "v1", "v2", "-", "total"]
    ran = cli("cost", run_dir)
    assert ran.returncode == 0 and "hosp-a" in ran.stdout
    prices.write_text("gb_transferred = -2\n")
    ran = cli("cost", run_dir, "--prices", prices)
    assert ran.returncode == 2 and "'gb_transferred'" in ran.stderr
    assert cli("cost", run_dir, "--prices", tmp_path / "none.toml").returncode == 2
    ran = cli("cost", tmp_path / "nowhere")
    assert ran.returncode == 2 and "not a fedq run folder" in ran.stderr


def test_org_is_left_off_the_wire_while_empty_and_travels_when_set() -> None:
    signer = Signer.generate()
    ring = Keyring()
    ring.add(signer.public, Role.WORKER, worker_id="w1")
    hello = Hello("w1", ("cpu",), signer.fingerprint, "up", 1.0)
    update = Update("t1", "j", "w1", 0, 5, "int8", 256, {"cpu_seconds": 1.0}, delta=b"x")
    for message in (hello, update):
        assert b"org" not in encode(message, signer)  # an older peer reads it as before
        claimed = type(message)(**{**message.__dict__, "org": "hosp-a"})
        assert decode(encode(claimed, signer), ring, type(message))[0] == claimed


def test_the_ledger_keeps_what_an_update_claims_it_cost() -> None:
    update = Update("t1", "j", "w1", 0, 5, "int8", 256, {"cpu_seconds": 1.5, "train_seconds": 2.0,
                    "bytes_down": float("nan"), "train_loss": 0.3}, org="hosp-a")
    assert claimed_costs(update) == {"cpu_seconds": 1.5, "wall_seconds": 2.0, "org": "hosp-a"}
    assert claimed_costs(None) == {}


def test_org_setting() -> None:
    assert WorkerConfig.from_settings(Settings(org=" hosp-a "), "w1", "0/1").org == "hosp-a"
    assert WorkerConfig.from_settings(Settings(), "w1", "0/1").org == ""
    for bad in ("x" * 65, "a\nb"):
        with pytest.raises(ConfigError, match="--org"):
            WorkerConfig.from_settings(Settings(org=bad), "w1", "0/1")


@pytest.mark.slow
def test_a_finished_runs_cost_totals_are_the_sums_in_its_ledger(run: tuple[Path, Names]) -> None:
    run_dir, _ = run
    cost = json.loads((run_dir / "summary.json").read_text())["cost"]
    ledger = [r for r in read_lines(run_dir / "ledger.jsonl") if r.get("fate") in ("applied", "rejected", "pending")]
    applied = [r for r in ledger if r["fate"] == "applied"]
    assert applied and all({"cpu_seconds", "wall_seconds", "bytes_down"} <= set(r) for r in applied)
    fates = Counter(r["fate"] for r in one_per_message(ledger))  # one fate per message, applied winning
    assert cost["updates_applied"] == fates["applied"] and cost["updates_rejected"] == fates["rejected"]
    assert cost["samples"] == sum(r["num_samples"] for r in applied)
    assert cost["bytes_up"] == sum(r["bytes"] for r in one_per_message(ledger))
    claims = {r["digest"]: r for r in applied}.values()  # claims count for applied updates only
    assert cost["bytes_down"] == sum(r.get("bytes_down", 0) for r in claims)
    assert math.isclose(cost["cpu_seconds"], sum(r.get("cpu_seconds", 0) for r in claims), abs_tol=1e-5)
    assert math.isclose(cost["wall_seconds"], sum(r.get("wall_seconds", 0) for r in claims), abs_tol=1e-5)
    assert cost["cpu_seconds"] > 0 and cost["bytes_down"] > 0
    assert cost["tasks_done"] == len({r["task_id"] for r in applied}) == fates["applied"]
    counts = json.loads((run_dir / "coordinator.json").read_text())["workers"]
    assert cost["tasks_expired"] == sum(c["expired"] for c in counts.values())
    assert cost["tasks_redelivered"] == sum(c["redelivered"] for c in counts.values())
    manifests = [json.loads(p.read_text()) for p in (run_dir / "store").rglob("v*.json")]
    assert cost["versions_stored"] == len(manifests) >= 7
    assert cost["store_bytes"] == sum(m["size"] + m["policy"].get("server_state", {}).get("size", 0) for m in manifests)
    ran = cli("cost", run_dir, "--csv")
    assert ran.returncode == 0
    head, *body = [line.split(",") for line in ran.stdout.splitlines()]
    total = dict(zip(head, body[-1], strict=True))
    assert total["worker"] == "total" and int(total["bytes_up"]) == cost["bytes_up"]
    assert int(total["store_bytes"]) == cost["store_bytes"]


# A pending record at a clean stop then the same message applied after the restart (its pending record
# holds only the claim-checked message's length), a duplicate of an applied message, a parked update
# rejected once per delivery, and records of an old ledger without digests.
MANY_FATES: tuple[dict[str, Any], ...] = (
    {"fate": "pending", "task_id": "t1", "worker_id": "w1", "digest": "a", "bytes": 40},
    {"fate": "applied", "task_id": "t1", "worker_id": "w1", "version": 1, "digest": "a", "bytes": 4000,
     "num_samples": 5, "cpu_seconds": 1.0},
    {"fate": "rejected", "reason": "duplicate", "task_id": "t1", "worker_id": "w1", "digest": "a", "bytes": 4000},
    {"fate": "rejected", "reason": "stale", "task_id": "t2", "worker_id": "w2", "digest": "b", "bytes": 30},
    {"fate": "rejected", "reason": "stale", "task_id": "t2", "worker_id": "w2", "digest": "b", "bytes": 30},
    {"fate": "pending", "task_id": "t3", "worker_id": "w2", "digest": "c", "bytes": 20},
    {"fate": "rollback", "version": 2},
    {"fate": "applied", "task_id": "t4", "worker_id": "w1", "version": 1, "bytes": 10},
    {"fate": "applied", "task_id": "t5", "worker_id": "w1", "version": 1, "bytes": 10},
)


def test_one_message_one_fate_and_the_applied_record_wins() -> None:
    kept = one_per_message(MANY_FATES)
    assert [(r.get("digest"), r["fate"]) for r in kept] == [
        ("a", "applied"), ("b", "rejected"), ("c", "pending"), (None, "applied"), (None, "applied"),
    ]
    assert kept[0]["bytes"] == 4000  # the applied record's, not the pending record's message length
    total = totals(Records(ledger=MANY_FATES))
    assert (total.updates_applied, total.updates_rejected, total.bytes_up) == (3, 1, 4070)
    assert (total.tasks_done, total.samples, total.cpu_seconds) == (3, 5, 1.0)


def test_a_rejected_message_claims_nothing() -> None:
    hostile = tuple(
        {"fate": "rejected", "reason": "unknown_task", "task_id": f"made-up-{n}", "worker_id": "w1", "digest": f"x{n}",
         "bytes": 10, "cpu_seconds": 9e6, "wall_seconds": 9e6, "bytes_down": 10**11, "org": "victim"}
        for n in range(3)
    )
    records = Records(ledger=hostile, orgs={"w1": "hosp-a"})
    total = totals(records)
    assert total == Usage(updates_rejected=3, bytes_up=30)
    assert {r.key for r in rows(records, By.ORG)} == {"hosp-a", STORE_ROW, TOTAL_ROW}  # not "victim"


def test_hello_task_counts_are_sanitised() -> None:
    records = Records(ledger=(), task_counts={"w1": {"expired": -5, "redelivered": 10**30}, "w2": {"expired": "7"}})
    total = totals(records)
    assert (total.tasks_expired, total.tasks_redelivered) == (0, 10**9)


def test_claims_are_capped_and_a_bad_org_is_dropped() -> None:
    update = Update("t1", "j", "w1", 0, 5, "int8", 256, {"cpu_seconds": 1e300, "train_seconds": 2.0,
                    "bytes_down": 1e30}, org="x" * 65)
    assert claimed_costs(update) == {"cpu_seconds": 1e7, "wall_seconds": 2.0, "bytes_down": 1e12}
    bad = Update("t1", "j", "w1", 0, 5, "int8", 256, {}, org="a\nb")
    assert claimed_costs(bad) == {}
    ledger = tuple({"fate": "applied", "worker_id": "w1", "version": 1, "digest": f"d{n}", "cpu_seconds": 1e308}
                   for n in range(3))
    assert totals(Records(ledger=ledger)).cpu_seconds == 3e7  # an old ledger's claims are capped too


def test_csv_labels_cannot_be_formulas() -> None:
    records = Records(ledger=(
        {"fate": "applied", "worker_id": "w1", "version": 1, "digest": "a", "org": "=HYPERLINK(\"http://x\")"},
        {"fate": "applied", "worker_id": "w2", "version": 1, "digest": "b", "org": "@SUM(A1)"},
        {"fate": "applied", "worker_id": "w3", "version": 1, "digest": "c", "org": "+1"},
    ))
    table = list(csv.reader(io.StringIO(render(rows(records, By.WORKER), By.WORKER, csv_out=True))))
    assert [line[1] for line in table[1:]] == ["'=HYPERLINK(\"http://x\")", "'@SUM(A1)", "'+1", "", ""]
    table = list(csv.reader(io.StringIO(render(rows(records, By.ORG), By.ORG, csv_out=True))))
    assert [line[0] for line in table[1:]] == ["'+1", "'=HYPERLINK(\"http://x\")", "'@SUM(A1)", STORE_ROW, TOTAL_ROW]
    by_version = render(rows(Records(ledger=({"fate": "rejected", "digest": "x"},)), By.VERSION), By.VERSION, csv_out=True)
    assert [line.split(",")[0] for line in by_version.splitlines()[1:]] == ["-", "total"]  # our own "-" stays
