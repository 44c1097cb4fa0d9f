"""Broker accounts as data (no broker): names, which account may speak for which worker, the
``--workers`` syntax, and the definitions document ``fedq broker apply`` sends."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from broker_config.names import Names
from broker_config.permissions import BrokerRole, job_users, permission, publisher_problem, user_name
from fedq.broker import Request, parse_workers, plan
from shared.errors import ConfigError
from shared.settings import Settings

NAMES = Names("fedq", "j1")


def test_an_account_speaks_only_for_its_own_worker_in_its_own_job() -> None:
    w1, w2 = (user_name(NAMES, BrokerRole.WORKER, w) for w in ("w1", "w2"))
    assert w1 == "fedq.j1.worker.w1"
    assert publisher_problem(NAMES, w1, "w1", required=True) == ""
    assert "not worker 'w1'" in publisher_problem(NAMES, w2, "w1", required=False)
    other_job = user_name(Names("fedq", "j2"), BrokerRole.WORKER, "w1")
    assert publisher_problem(NAMES, other_job, "w1", required=False)
    for role in (BrokerRole.COORDINATOR, BrokerRole.AGGREGATOR, BrokerRole.OBSERVER):
        assert publisher_problem(NAMES, user_name(NAMES, role), "w1", required=False)
    # an operator's account outside the namespace (e.g. requeueing a dead letter) passes
    assert publisher_problem(NAMES, "guest", "w1", required=True) == ""
    # no user_id: only when required
    assert publisher_problem(NAMES, None, "w1", required=False) == ""
    assert "names no broker user" in publisher_problem(NAMES, None, "w1", required=True)
    assert publisher_problem(NAMES, "fedq.j1.worker.", "", required=False)  # no worker id matches an account


def test_permissions_name_exactly_the_job_s_queues_and_exchanges() -> None:
    worker = permission(NAMES, BrokerRole.WORKER, ("cpu",))
    assert re.fullmatch(worker.read, NAMES.task_queue("cpu"))
    for name in (
        NAMES.task_queue("gpu"),
        NAMES.updates_queue,
        NAMES.update_log,
        NAMES.task_queue("cpu") + "x",
    ):
        assert not re.fullmatch(worker.read, name), name
    assert worker.configure == "^$"
    observer = permission(NAMES, BrokerRole.OBSERVER)
    assert observer.write == observer.configure == "^$"
    coordinator = permission(NAMES, BrokerRole.COORDINATOR)
    assert re.fullmatch(coordinator.configure, NAMES.coordinator_queue)
    assert re.fullmatch(coordinator.configure, NAMES.listener_prefix + "abc")
    assert not re.fullmatch(coordinator.configure, Names("fedq", "j2").coordinator_queue)


def test_workers_syntax() -> None:
    assert parse_workers("w1, w2:gpu+cpu,", ("cpu", "gpu")) == {"w1": (), "w2": ("gpu", "cpu")}
    with pytest.raises(ConfigError, match="not the job's"):
        parse_workers("w1:tpu", ("cpu",))
    with pytest.raises(ConfigError, match="invalid worker id"):
        parse_workers("w 1", ("cpu",))


def test_the_document_holds_hashes_topic_permissions_and_the_dead_letter_bound(tmp_path: Path) -> None:
    settings = Settings(job="j1", capabilities="cpu,gpu", keys_dir=str(tmp_path / "keys"))
    found, doc = plan(settings, Request(workers="w1:cpu,w2", secrets_dir=str(tmp_path / "s")))
    users = {u["name"]: u for u in doc["users"]}
    assert set(users) == {u.name for u in job_users(NAMES, ("cpu", "gpu"), {"w1": (), "w2": ()})}
    text = str(doc)
    for account in found:
        assert account.password not in text  # hashes only
        assert stat.S_IMODE(account.password_file.stat().st_mode) == 0o600
    perms = {p["user"]: p for p in doc["permissions"]}
    assert perms["fedq.j1.worker.w1"]["read"] == "^(fedq\\.job\\.j1\\.tasks\\.cpu)$"
    assert "gpu" in perms["fedq.j1.worker.w2"]["read"]
    topics = {(t["user"], t["exchange"]): t["write"] for t in doc["topic_permissions"]}
    assert topics[("fedq.j1.worker.w1", "fedq.results")] == "^j1(\\.shard\\.[0-9]+)?$"  # its job's key, or a shard's
    assert topics[("fedq.j1.aggregator", "fedq.models")] == "^((model|receipt)\\.j1|verdict\\.j1\\.[0-9]+)$"
    assert topics[("fedq.j1.aggregator", "fedq.results")] == "^j1\\.partials$"  # an edge's partials, no update
    assert [p["definition"] for p in doc["policies"]] == [
        {"max-length-bytes": 1024**3, "overflow": "drop-head"}
    ]
    assert "vhosts" not in doc
    # enrolled workers by default
    (tmp_path / "keys" / "trusted" / "workers").mkdir(parents=True)
    (tmp_path / "keys" / "trusted" / "workers" / "w9.pub").write_text("key")
    found, _ = plan(settings, Request(secrets_dir=str(tmp_path / "s")))
    assert [a.user.worker_id for a in found if a.user.role is BrokerRole.WORKER] == ["w9"]
