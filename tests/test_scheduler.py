"""The coordinator's scheduler (pure): the fleet gate, async top-ups, sync rounds, in-flight
expiry, stop rules and resuming from ``coordinator.json``. No broker, no training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig, Mode
from coordinator.registry import WorkerChange
from coordinator.scheduler import CloseRound, Gate, OpenRound, Publish, Scheduler, StopReason
from coordinator.state import CoordinatorState, InFlight
from coordinator.tasks import sample_cap
from shared.errors import ConfigError
from shared.settings import Settings
from tests.support.messages import a_hello

STATE_KEYS = {
    "job_id",
    "mode",
    "stop_reason",
    "started",
    "t0",
    "stopped",
    "tasks_issued",
    "bytes_down",
    "latest_version",
    "best_accuracy",
    "last_accuracy",
    "workers_seen",
    "workers",
    "round",
    "fleet_ready",
    "workers_live",
    "min_workers",
    "in_flight",
    "orgs",
}


def config(**kw: Any) -> CoordinatorConfig:
    kw.setdefault("min_workers", 1)
    kw.setdefault("target_accuracy", 0.0)
    kw.setdefault("max_seconds", 0.0)
    return CoordinatorConfig(job_id="job", **kw)


def scheduler(started: float = 0.0, **kw: Any) -> Scheduler:
    s = Scheduler.begin(config(**kw), None, started)
    s.adopt(0, 0)
    return s


def join(s: Scheduler, *workers: str, now: float = 0.0, caps: tuple[str, ...] = ("cpu",)) -> None:
    for w in workers:
        assert s.hello(a_hello(w, caps), "fp", now) is WorkerChange.JOINED


def issue(s: Scheduler, publishes: tuple[Publish, ...], now: float, prefix: str = "t") -> list[str]:
    """Carry out publish decisions as the service does; the task ids."""
    ids = []
    for p in publishes:
        for i in range(p.count):
            tid = f"{prefix}-{p.capability}-{len(s.in_flight)}-{i}"
            s.issued(tid, p.capability, s.version, now + p.ttl, 100, now)
            ids.append(tid)
    return ids


# -- the fleet gate ----------------------------------------------------------------------------


def test_no_task_until_min_workers_said_hello() -> None:
    s = scheduler(min_workers=3, min_workers_wait=60.0)
    join(s, "w1", "w2", now=1.0)
    waiting = s.fleet(2.0)
    assert (waiting.gate, waiting.have, waiting.need, waiting.waited) == (Gate.WAITING, 2, 3, 2.0)
    assert not waiting.open and s.top_up(2.0) == ()
    join(s, "w3", now=3.0)
    ready = s.fleet(3.0)
    assert (ready.gate, ready.have, ready.need) == (Gate.READY, 3, 3) and ready.open
    assert s.fleet(3.1).gate is Gate.OPEN  # ready is said once
    assert s.top_up(3.1) == (Publish("cpu", 3, 120.0),)


def test_the_gate_opens_without_the_fleet_when_the_wait_runs_out_and_stays_open() -> None:
    s = scheduler(started=10.0, min_workers=3, min_workers_wait=2.0)
    join(s, "w1", now=10.0)
    assert s.fleet(11.9).gate is Gate.WAITING
    late = s.fleet(12.0)
    assert (late.gate, late.have, late.need) == (Gate.WITHOUT_FLEET, 1, 3)
    assert s.top_up(12.0) == (Publish("cpu", 1, 120.0),)
    assert s.hello(a_hello("w1", state="down"), "fp", 13.0) is WorkerChange.LEFT
    assert s.fleet(13.0).gate is Gate.OPEN  # for good, even with nobody left
    assert s.top_up(13.0) == ()  # but nobody to hand work to


def test_a_resumed_job_that_handed_out_work_does_not_wait_again(tmp_path: Path) -> None:
    CoordinatorState("job", "async", started=0.0, t0=5.0, tasks_issued=7).write(tmp_path)
    s = Scheduler.begin(config(min_workers=3, min_workers_wait=60.0), CoordinatorState.read(tmp_path), 20.0)
    s.adopt(0, 0)
    assert s.resumed
    join(s, "w1", now=20.0)
    assert s.fleet(20.0).gate is Gate.OPEN
    assert s.top_up(20.0) == (Publish("cpu", 1, 120.0),)


def test_a_resumed_job_that_had_not_started_waits_again() -> None:
    saved = CoordinatorState("job", "async", started=0.0, fleet_ready=True)  # ready, but no task yet
    s = Scheduler.begin(config(min_workers=2, min_workers_wait=60.0), saved, 1.0)
    join(s, "w1", now=1.0)
    assert s.fleet(1.0).gate is Gate.WAITING


# -- async top-ups and in-flight bookkeeping ---------------------------------------------------


def test_top_up_keeps_one_task_per_live_worker_in_flight() -> None:
    s = scheduler()
    join(s, "w1", "w2")
    s.fleet(0.0)
    first = issue(s, s.top_up(0.0), 0.0)
    assert len(first) == 2 and s.state.t0 == 0.0
    assert (s.state.tasks_issued, s.state.bytes_down) == (2, 200)
    assert s.top_up(0.5) == ()  # both in flight
    assert s.done([first[0], "unknown"]) == 1  # a receipt
    assert s.top_up(0.6) == (Publish("cpu", 1, 120.0),)
    join(s, "w3", now=0.7)
    assert s.top_up(0.7) == (Publish("cpu", 2, 120.0),)


def test_concurrency_is_per_capability_and_each_worker_counts_once() -> None:
    s = scheduler(capabilities=("cpu", "gpu"))
    join(s, "a", caps=("cpu",))
    join(s, "b", caps=("gpu", "cpu"))
    join(s, "c", caps=("lowmem",))  # not a capability of this job
    s.fleet(0.0)
    assert s.top_up(0.0) == (Publish("cpu", 1, 120.0), Publish("gpu", 1, 120.0))
    fixed = scheduler(capabilities=("cpu", "gpu"), concurrency=4)
    join(fixed, "a", caps=("cpu",))
    fixed.fleet(0.0)
    assert fixed.top_up(0.0) == (Publish("cpu", 4, 120.0),)  # no gpu worker: no gpu tasks


def test_expired_tasks_and_quiet_workers_are_swept() -> None:
    s = scheduler(task_ttl=10.0, worker_timeout=30.0)
    join(s, "w1")
    s.fleet(0.0)
    (tid,) = issue(s, s.top_up(0.0), 0.0)
    assert s.in_flight[tid] == InFlight("cpu", 10.0, 0)
    assert s.sweep(10.0).tasks == 0 and tid in s.in_flight  # expires after its deadline, not at it
    swept = s.sweep(10.1)
    assert (swept.tasks, swept.workers) == (1, ()) and s.in_flight == {}
    assert s.top_up(10.1) == (Publish("cpu", 1, 10.0),)  # its place is free again
    assert s.sweep(30.1).workers == ("w1",)
    assert s.top_up(30.1) == ()


def test_a_version_forgets_the_tasks_it_applied() -> None:
    s = scheduler()
    join(s, "w1", "w2")
    s.fleet(0.0)
    ids = issue(s, s.top_up(0.0), 0.0)
    assert s.done(ids[:1]) == 1 and s.adopt(1, 1)
    assert not s.adopt(1, 1) and not s.adopt(0, 5)  # not newer
    assert s.version == 1 and s.updates_total == 1 and set(s.in_flight) == set(ids[1:])


# -- sync rounds --------------------------------------------------------------------------------


def sync(**kw: Any) -> Scheduler:
    kw.setdefault("worker_timeout", 1000.0)  # the workers stay live over the test's rounds
    s = scheduler(mode=Mode.SYNC, round_timeout=60.0, **kw)
    join(s, "w1", "w2")
    s.fleet(0.0)
    return s


def test_a_round_is_one_task_per_live_worker_on_one_version() -> None:
    s = sync()
    assert s.top_up(0.0) == ()  # sync mode never tops up
    opened = s.round_step(1.0)
    assert opened == OpenRound(1, 0, 2, 61.0, (Publish("cpu", 2, 60.0, round=1),))
    issue(s, opened.tasks, 1.0)
    join(s, "w3", now=2.0)
    assert s.round_step(2.0) is None  # one round at a time, whoever joins
    assert s.state.round == 1


def test_a_round_ends_with_its_version_and_the_next_opens_on_it() -> None:
    s = sync()
    opened = s.round_step(1.0)
    assert isinstance(opened, OpenRound)
    ids = issue(s, opened.tasks, 1.0)
    assert s.done(ids) == 2 and s.adopt(1, 2)
    nxt = s.round_step(5.0)
    assert isinstance(nxt, OpenRound) and (nxt.round, nxt.version, nxt.deadline) == (2, 1, 65.0)


def test_no_round_opens_on_the_jobs_last_version() -> None:
    s = sync(max_versions=1)
    opened = s.round_step(1.0)
    assert isinstance(opened, OpenRound)
    issue(s, opened.tasks, 1.0)
    s.adopt(1, 2)
    assert s.round_step(2.0) is None and s.state.round == 1
    assert s.state.stop_reason == "max_versions"


def test_a_round_closes_at_its_deadline_and_waits_a_grace_for_its_version() -> None:
    s = sync()
    opened = s.round_step(1.0)
    assert isinstance(opened, OpenRound)
    ids = issue(s, opened.tasks, 1.0, prefix="r1")
    s.done(ids[:1])  # one answered in time
    assert s.round_step(60.9) is None
    assert s.round_step(61.0) == CloseRound(1, 0, 2, 61.0)
    assert s.round_closed
    assert s.done(ids[1:]) == 1  # a late answer after the close still leaves the in-flight set
    assert s.round_step(65.9) is None  # the grace: the aggregator folds what it has
    nxt = s.round_step(66.0)  # no version came: the next round on the same version
    assert isinstance(nxt, OpenRound) and (nxt.round, nxt.version) == (2, 0)
    assert not s.round_closed


def test_a_late_answer_after_the_round_is_over_changes_nothing() -> None:
    s = sync()
    opened = s.round_step(1.0)
    assert isinstance(opened, OpenRound)
    late = issue(s, opened.tasks, 1.0, prefix="r1")
    assert isinstance(s.round_step(61.0), CloseRound)
    nxt = s.round_step(66.0)
    assert isinstance(nxt, OpenRound)
    assert s.in_flight == {}  # the round's unanswered tasks are dropped with it
    current = issue(s, nxt.tasks, 66.0, prefix="r2")
    assert s.done(late) == 0
    assert set(s.in_flight) == set(current) and s.round_step(67.0) is None


def test_no_round_while_the_fleet_waits_or_nobody_is_live() -> None:
    s = scheduler(mode=Mode.SYNC, min_workers=2, min_workers_wait=60.0)
    join(s, "w1")
    s.fleet(1.0)
    assert s.round_step(1.0) is None
    join(s, "w2", now=2.0)
    s.fleet(2.0)
    assert isinstance(s.round_step(2.0), OpenRound)
    empty = scheduler(mode=Mode.SYNC, min_workers=0)
    assert empty.fleet(0.0).open and empty.round_step(0.0) is None and empty.state.round == 0


# -- stop rules ---------------------------------------------------------------------------------


def test_stop_reasons_are_the_strings_summaries_show() -> None:
    assert [r.value for r in StopReason] == ["target_accuracy", "max_versions", "max_updates", "max_seconds"]
    assert StopReason.MAX_SECONDS == "max_seconds" and Mode("sync") is Mode.SYNC


def test_target_accuracy() -> None:
    s = scheduler(target_accuracy=0.85)
    assert not s.evaluated(0.6) and s.stop(1.0) is None
    assert s.evaluated(0.9) and s.stop(1.0) is StopReason.TARGET_ACCURACY
    assert (s.state.best_accuracy, s.state.last_accuracy) == (0.9, 0.9)
    assert s.state.stop_reason == "target_accuracy"
    off = scheduler(target_accuracy=0.0)
    assert not off.evaluated(1.0) and off.stop(1.0) is None


def test_max_versions_updates_and_seconds() -> None:
    versions = scheduler(max_versions=3)
    versions.adopt(2, 0)
    assert versions.stop(0.0) is None
    versions.adopt(3, 0)
    assert versions.stop(0.0) is StopReason.MAX_VERSIONS
    updates = scheduler(max_updates=10)
    updates.adopt(1, 9)
    assert updates.stop(0.0) is None
    updates.adopt(2, 10)
    assert updates.stop(0.0) is StopReason.MAX_UPDATES
    seconds = scheduler(started=100.0, max_seconds=300.0)
    join(seconds, "w1", now=100.0)
    seconds.fleet(100.0)
    issue(seconds, seconds.top_up(100.0), 100.0)
    assert seconds.stop(399.9) is None and seconds.stop(400.0) is StopReason.MAX_SECONDS


def test_max_seconds_counts_from_the_first_task_not_the_wait_for_the_fleet() -> None:
    """As ``seconds_to_accuracy`` does: the job's clock starts at ``t0``."""
    s = scheduler(
        started=100.0, max_seconds=300.0, min_workers=2, min_workers_wait=120.0, worker_timeout=1000.0
    )
    join(s, "w1", now=101.0)
    assert not s.fleet(101.0).open and s.stop(150.0) is None
    join(s, "w2", now=150.0)
    assert s.fleet(150.0).gate is Gate.READY
    issue(s, s.top_up(150.0), 150.0)
    assert s.state.t0 == 150.0
    assert s.stop(400.0) is None  # 300 s after the start, but 250 s after the first task
    assert s.stop(449.9) is None and s.stop(450.0) is StopReason.MAX_SECONDS
    # a resumed coordinator keeps the job's t0, and with it the same end
    again = Scheduler.begin(s.config, dataclasses.replace(s.state, stop_reason=None), 500.0)
    assert again.state.t0 == 150.0 and again.stop(500.0) is StopReason.MAX_SECONDS


def test_max_seconds_ends_a_job_no_worker_joins() -> None:
    """No task ever goes out: the clock counts from the end of the fleet wait."""
    s = scheduler(started=100.0, max_seconds=300.0, min_workers=2, min_workers_wait=60.0)
    assert s.fleet(160.0).gate is Gate.WITHOUT_FLEET and s.top_up(160.0) == ()
    assert s.state.t0 is None
    assert s.stop(459.9) is None and s.stop(460.0) is StopReason.MAX_SECONDS


def test_the_first_rule_wins_and_a_stop_holds() -> None:
    s = scheduler(target_accuracy=0.5, max_versions=1, max_seconds=10.0)
    join(s, "w1")
    s.fleet(0.0)
    s.adopt(1, 1)
    s.evaluated(0.7)
    assert s.stop(20.0) is StopReason.TARGET_ACCURACY
    s.evaluated(0.1)
    assert s.stop(21.0) is StopReason.TARGET_ACCURACY  # decided once
    assert s.top_up(21.0) == ()  # and nothing goes out after it
    r = sync(max_seconds=10.0)
    opened = r.round_step(0.0)
    assert isinstance(opened, OpenRound)
    issue(r, opened.tasks, 0.0)
    assert r.stop(10.0) is StopReason.MAX_SECONDS and r.round_step(10.0) is None


# -- coordinator.json ---------------------------------------------------------------------------


def test_the_state_file_keeps_every_key_and_a_restart_resumes_from_it(tmp_path: Path) -> None:
    s = scheduler(started=100.0, task_ttl=10.0)
    s.hello(dataclasses.replace(a_hello("w1", tasks_received=3, tasks_completed=2), org="hosp-a"), "fp", 100.0)
    s.fleet(100.0)
    (old,) = issue(s, s.top_up(100.0), 100.0, prefix="old")
    s.done([old])
    (fresh,) = issue(s, s.top_up(105.0), 105.0, prefix="new")  # deadline 115
    s.evaluated(0.4)
    s.adopt(2, 5)
    s.snapshot(106.0).write(tmp_path)
    data = json.loads((tmp_path / "coordinator.json").read_text())
    assert set(data) == STATE_KEYS
    assert data["workers"] == {"w1": {"received": 3, "completed": 2, "expired": 0, "redelivered": 0}}
    assert data["in_flight"] == {fresh: {"capability": "cpu", "deadline": 115.0, "version": 0}}
    assert (data["workers_seen"], data["workers_live"], data["stopped"]) == (["w1"], 1, 106.0)
    assert (data["mode"], data["latest_version"], data["fleet_ready"]) == ("async", 2, True)
    assert data["stop_reason"] is None
    assert data["orgs"] == {"w1": "hosp-a"}  # the worker's own claim, for fedq cost

    again = Scheduler.begin(config(task_ttl=10.0), CoordinatorState.read(tmp_path), 110.0)
    st = again.state
    assert again.resumed and (st.started, st.t0, st.tasks_issued, st.bytes_down) == (100.0, 100.0, 2, 200)
    assert (st.best_accuracy, st.last_accuracy, set(st.in_flight)) == (0.4, 0.4, {fresh})
    assert again.registry.counts["w1"]["completed"] == 2 and not st.fleet_ready
    assert again.snapshot(110.0).orgs == {"w1": "hosp-a"}
    later = Scheduler.begin(config(), CoordinatorState.read(tmp_path), 116.0)
    assert later.in_flight == {}  # expired while no coordinator ran


def test_a_finished_or_foreign_or_broken_state_starts_a_new_job(tmp_path: Path) -> None:
    CoordinatorState("job", started=1.0, t0=2.0, stop_reason="max_seconds").write(tmp_path)
    done = Scheduler.begin(config(), CoordinatorState.read(tmp_path), 50.0)
    assert not done.resumed and (done.state.started, done.state.t0) == (50.0, None)
    CoordinatorState("other-job", started=1.0, t0=2.0).write(tmp_path)
    assert not Scheduler.begin(config(), CoordinatorState.read(tmp_path), 50.0).resumed
    (tmp_path / "coordinator.json").write_text("{not json")
    assert CoordinatorState.read(tmp_path) is None
    (tmp_path / "coordinator.json").write_text(json.dumps({"stop_reason": None}))
    assert CoordinatorState.read(tmp_path) is None  # no job id
    assert CoordinatorState.read(tmp_path / "missing") is None


def test_config_from_settings() -> None:
    c = CoordinatorConfig.from_settings(
        Settings(job="j1", mode="sync", capabilities="cpu,gpu", local_epochs=2)
    )
    assert (c.job_id, c.mode, c.capabilities, c.train.epochs) == ("j1", Mode.SYNC, ("cpu", "gpu"), 2)
    for bad in ({"mode": "fast"}, {"min_workers": -1}, {"min_workers_wait": -1.0}, {"job": "a b"}):
        with pytest.raises(ConfigError):
            CoordinatorConfig.from_settings(Settings(**bad))


def test_the_sample_cap_is_one_fair_share_of_the_apps_training_set_unless_set() -> None:
    class App:
        def train_data(self) -> tuple[list[int], list[int]]:
            return [], list(range(1000))

    config = CoordinatorConfig(job_id="j", min_workers=4)
    assert sample_cap(config, App()) == 250  # a worker claiming 10**9 weighs as one with an even split
    assert sample_cap(dataclasses.replace(config, max_samples=70), App()) == 70
    assert sample_cap(config, object()) == 0  # an app that does not say its size: no cap (clipping still bounds it)
