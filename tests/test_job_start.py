"""When a job starts: the coordinator waits for its fleet (``--min-workers``) before the first task,
and a restarted one picks the job up without waiting again. Coordinators run here in the test's
process on the in-memory broker; fake workers are just signed hellos."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import Mode
from fedq.cli import _given, _settings, build_parser, main
from fedq.progress import Progress
from fedq.run import job_started
from shared.settings import Settings
from shared.store import ModelStore, open_store
from shared.transport.memory import MemoryTransport
from tests.support.messages import save_version, tiny_model
from tests.support.rigs import coordinator_rig
from tests.support.waiting import WAIT, events, until

# -- the coordinator waits for its fleet -------------------------------------------------------


def write_resumable_state(out: Path, job: str, in_flight: dict[str, Any] | None = None) -> float:
    """coordinator.json as a coordinator killed mid-job leaves it: started, t0 set, no stop reason."""
    now = time.time()
    state = {
        "job_id": job,
        "stop_reason": None,
        "started": now,
        "t0": now - 5.0,
        "tasks_issued": 7,
        "in_flight": in_flight or {},
    }
    (out / "coordinator.json").write_text(json.dumps(state))
    return now - 5.0


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_no_task_until_the_nth_worker_says_hello(mem: MemoryTransport, tmp_path: Path, mode: str) -> None:
    async with coordinator_rig(
        mem, tmp_path, mode=Mode(mode), min_workers=3, min_workers_wait=60.0, worker_timeout=30.0
    ) as rig:
        coordinator, logs = rig.coordinator, rig.logs
        rig.join("w1")
        rig.join("w2")
        await until(
            lambda: coordinator.scheduler.registry.live_count(time.time()) == 2, "two workers registered"
        )
        await asyncio.sleep(1.5)  # ticks of the coordinator's loop (0.1 s async, 0.5 s sync) go by
        state = coordinator.scheduler.state
        assert rig.tasks == [] and state.tasks_issued == 0 and state.t0 is None
        waiting = events(logs, "waiting_for_workers")
        assert waiting and waiting[-1]["need"] == 3 and waiting[0]["have"] <= 2, waiting
        saved = json.loads((tmp_path / "coordinator.json").read_text())
        assert saved["t0"] is None and not saved["fleet_ready"] and saved["min_workers"] == 3

        rig.join("w3")
        await until(lambda: len(rig.tasks) >= 3, "a task per worker once the third said hello")
        assert state.t0 is not None and state.fleet_ready
        ready = events(logs, "fleet_ready")
        assert len(ready) == 1 and ready[0]["have"] == 3 and ready[0]["need"] == 3, ready
        assert not events(logs, "starting_without_fleet")
        if mode == "sync":
            opened = events(logs, "round_open")
            assert opened and opened[0]["size"] == 3, opened  # the first round has the whole fleet
        rig.check_alive()


async def test_starts_anyway_after_the_wait_with_a_warning(mem: MemoryTransport, tmp_path: Path) -> None:
    async with coordinator_rig(mem, tmp_path, min_workers=3, min_workers_wait=2.0, worker_timeout=30.0) as rig:
        rig.join("w1")
        await until(lambda: rig.tasks, "a task after the wait", wait=2.0 + WAIT)
        state = rig.coordinator.scheduler.state
        assert state.t0 is not None
        assert state.t0 - state.started >= 2.0  # not before the wait ran out
        assert len(rig.tasks) == 1  # one live worker, one task
        (warning,) = events(rig.logs, "starting_without_fleet")
        assert warning["log_level"] == "warning"
        assert (warning["have"], warning["need"]) == (1, 3), warning
        assert not events(rig.logs, "fleet_ready")
        rig.check_alive()


async def test_a_resumed_job_does_not_wait_again(mem: MemoryTransport, tmp_path: Path) -> None:
    t0 = write_resumable_state(tmp_path, mem.names.job)
    async with coordinator_rig(mem, tmp_path, min_workers=3, min_workers_wait=60.0, worker_timeout=30.0) as rig:
        assert events(rig.logs, "resumed_job")
        rig.join("w1")
        await until(lambda: rig.tasks, "a task for the one worker there is", wait=5.0)
        state = rig.coordinator.scheduler.state
        assert state.t0 == t0  # the job's clock is the one it had
        assert state.tasks_issued >= 8
        assert not events(rig.logs, "waiting_for_workers") and not events(rig.logs, "starting_without_fleet")
        rig.check_alive()


async def test_a_resumed_job_forgets_tasks_a_stored_version_applied(mem: MemoryTransport, tmp_path: Path) -> None:
    """The last state was written before the previous coordinator saw version 1 (which applied
    task ``done``): ``done`` must not keep the one worker's place until its TTL."""
    job = mem.names.job
    store = ModelStore(open_store(str(tmp_path / "store")), job)  # where the rig's coordinator looks
    blob = tiny_model().to_bytes()
    for version, ids in ((0, ()), (1, ("done",))):
        await save_version(store, blob, version, ids)
    late = time.time() + 600
    write_resumable_state(tmp_path, job, {"done": {"capability": "cpu", "deadline": late, "version": 0}})
    async with coordinator_rig(mem, tmp_path, worker_timeout=30.0) as rig:
        (forgot,) = events(rig.logs, "in_flight_already_applied")
        assert forgot["count"] == 1
        rig.join("w1")
        await until(lambda: rig.tasks, "a task for the one worker", wait=5.0)
        assert rig.tasks[0].base_version == 1
        assert set(rig.coordinator.scheduler.in_flight) == {rig.tasks[0].task_id}
        rig.check_alive()


# -- flags, fedq run and its progress line -----------------------------------------------------


def test_min_workers_flags_and_environment() -> None:
    args = build_parser().parse_args(["coordinator", "--min-workers", "5", "--min-workers-wait", "30"])
    s = _settings(args)
    assert (s.min_workers, s.min_workers_wait) == (5, 30.0)
    assert _given(args, "min_workers", env={})
    assert Settings().min_workers == 1 and Settings().min_workers_wait == 120.0  # fedq coordinator
    assert Settings.from_env({"FEDQ_MIN_WORKERS": "4"}).min_workers == 4
    plain = build_parser().parse_args(["run", "--workers", "7"])
    assert not _given(plain, "min_workers", env={})  # so fedq run waits for all its workers
    assert _given(plain, "min_workers", env={"FEDQ_MIN_WORKERS": "2"})


def test_help_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "coordinator"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--min-workers" in text and "--min-workers-wait" in text and "FEDQ_MIN_WORKERS" in text


def test_progress_says_it_is_waiting_for_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "coordinator.json"
    progress = Progress(tmp_path, Settings(), live=False)
    state.write_text(json.dumps({"t0": None, "fleet_ready": False, "workers_live": 7, "min_workers": 20}))
    progress.update()
    assert "waiting for workers 7/20" in capsys.readouterr().out
    state.write_text(
        json.dumps({"t0": time.time(), "fleet_ready": True, "workers_live": 20, "min_workers": 20})
    )
    progress.last_print = 0.0
    progress.update()
    out = capsys.readouterr().out
    assert "waiting" not in out and "version=0" in out


def test_chaos_waits_for_the_job_to_start(tmp_path: Path) -> None:
    """fedq run --chaos starts killing at the first task: not while the fleet it waits for starts up."""
    assert not job_started(tmp_path)
    state = tmp_path / "coordinator.json"
    state.write_text(json.dumps({"t0": None, "fleet_ready": False}))
    assert not job_started(tmp_path)
    state.write_text(json.dumps({"t0": time.time(), "fleet_ready": True}))
    assert job_started(tmp_path)
