"""The worker's task decision (``worker.decision``) and its config, without a broker."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from shared.errors import ConfigError
from shared.settings import Settings
from worker.config import WorkerConfig
from worker.decision import Decision, Known, decide, outbox_matters, task_problem

NOW = 1_800_000_000.0
FRESH = Known(already_sent=False, task_id_ok=True, in_outbox=False, deadline=NOW + 60, now=NOW)


def known(**changes: object) -> Known:
    return dataclasses.replace(FRESH, **changes)  # type: ignore[arg-type]


def test_a_fresh_task_is_trained() -> None:
    assert decide(FRESH) is Decision.TRAIN


def test_a_task_whose_update_was_confirmed_is_acked_without_training() -> None:
    assert decide(known(already_sent=True)) is Decision.ALREADY_SENT


def test_a_task_id_the_outbox_cannot_name_is_dead_lettered() -> None:
    assert decide(known(task_id_ok=False)) is Decision.BAD_TASK_ID


def test_a_task_whose_update_waits_in_the_outbox_sends_that() -> None:
    assert decide(known(in_outbox=True)) is Decision.IN_OUTBOX


def test_a_task_past_its_deadline_expires() -> None:
    assert decide(known(deadline=NOW - 0.001)) is Decision.EXPIRED


def test_a_task_at_its_deadline_is_still_trained() -> None:
    assert decide(known(deadline=NOW)) is Decision.TRAIN


def test_dead_letter_reasons_are_the_decision_values() -> None:
    # the worker dead-letters with these strings: the dlq tool and the tests read them
    assert Decision.EXPIRED.value == "expired"
    assert Decision.BAD_TASK_ID.value == "bad_task_id"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # a confirmed update wins over everything: the work is done, whatever else holds
        ({"already_sent": True, "task_id_ok": False}, Decision.ALREADY_SENT),
        ({"already_sent": True, "in_outbox": True}, Decision.ALREADY_SENT),
        ({"already_sent": True, "deadline": NOW - 1}, Decision.ALREADY_SENT),
        # an unnameable id is refused before its deadline counts
        ({"task_id_ok": False, "deadline": NOW - 1}, Decision.BAD_TASK_ID),
        # an update already trained is sent even when the task has expired meanwhile
        ({"in_outbox": True, "deadline": NOW - 1}, Decision.IN_OUTBOX),
    ],
)
def test_which_check_comes_first(changes: dict[str, object], expected: Decision) -> None:
    assert decide(known(**changes)) is expected


def test_every_combination_trains_only_when_nothing_stands_in_the_way() -> None:
    for sent, ok, waiting, late in itertools.product((False, True), repeat=4):
        k = known(already_sent=sent, task_id_ok=ok, in_outbox=waiting, deadline=NOW - 1 if late else NOW + 1)
        trains = decide(k) is Decision.TRAIN
        assert trains == (not sent and ok and not waiting and not late), k


@pytest.mark.parametrize(("sent", "ok"), list(itertools.product((False, True), repeat=2)))
def test_the_outbox_is_looked_at_only_when_its_answer_counts(sent: bool, ok: bool) -> None:
    """The worker skips the disk when ``outbox_matters`` says no: then the decision must not
    depend on what the outbox holds."""
    matters = outbox_matters(sent, ok)
    assert matters == (ok and not sent)
    for late in (False, True):
        deadline = NOW - 1 if late else NOW + 1
        with_entry = decide(known(already_sent=sent, task_id_ok=ok, in_outbox=True, deadline=deadline))
        without = decide(known(already_sent=sent, task_id_ok=ok, in_outbox=False, deadline=deadline))
        assert (with_entry != without) == matters


# -- the config --------------------------------------------------------------------------------


def test_config_from_settings() -> None:
    settings = Settings(
        capability="cpu,lowmem",
        delay=0.5,
        heartbeat_interval=7.0,
        model_seed=3,
        threads=2,
        partition="2/5",
        job="a,b,a",
    )
    config = WorkerConfig.from_settings(settings, "w-2", "2/5")
    assert config == WorkerConfig(
        worker_id="w-2",
        capabilities=("cpu", "lowmem"),
        partition="2/5",
        delay=0.5,
        heartbeat_interval=7.0,
        model_seed=3,
        threads=2,
        jobs=("a", "b"),
    )
    assert config.warm and config.flush_retry == 30.0  # laptop defaults for what settings do not say
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.delay = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("jobs", ["", " , ", "a,b.c", "a b"])
def test_config_needs_valid_jobs(jobs: str) -> None:
    with pytest.raises(ConfigError):
        WorkerConfig.from_settings(Settings(job=jobs), "w", "0/1")


def test_config_needs_a_capability() -> None:
    with pytest.raises(ConfigError):
        WorkerConfig.from_settings(Settings(capability=" , "), "w1", "0/1")


@pytest.mark.parametrize(
    ("quant", "block", "epochs", "batch", "bad"),
    [
        ("int8", 256, 1, 16, False),
        ("fp4", 256, 1, 16, True),
        ("int8", 0, 1, 16, True),
        ("none", 8, 0, 16, True),
        ("none", 8, 1, -1, True),
    ],
)
def test_a_task_no_worker_can_carry_out_is_dead_lettered_before_training(
    quant: str, block: int, epochs: int, batch: int, bad: bool
) -> None:
    problem = task_problem(quant, block, epochs, batch, ("int8", "none"))
    assert bool(problem) is bad
    assert decide(known(task_problem=problem)) is (Decision.BAD_TASK if bad else Decision.TRAIN)
    # a confirmed update still wins: the task's problem does not matter any more
    assert decide(known(task_problem=problem, already_sent=True)) is Decision.ALREADY_SENT


@pytest.mark.parametrize(
    ("dp_clip", "dp_noise", "prox_mu", "bad"),
    [
        (0.0, 0.0, 0.0, False),
        (1.0, 0.5, 0.01, False),
        (-1.0, 0.5, 0.0, True),
        (math.inf, 0.5, 0.0, True),
        (1.0, math.nan, 0.0, True),
        (0.0, 0.5, 0.0, True),  # noise with no clip to scale it by
        (0.0, 0.0, -0.1, True),
        (0.0, 0.0, math.nan, True),
    ],
)
def test_a_task_with_impossible_privacy_or_proximal_settings_is_dead_lettered(
    dp_clip: float, dp_noise: float, prox_mu: float, bad: bool
) -> None:
    problem = task_problem("int8", 256, 1, 16, ("int8",), dp_clip, dp_noise, prox_mu)
    assert bool(problem) is bad
