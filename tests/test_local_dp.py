"""Local differential privacy (``--dp-local``): the coordinator signs the clip and noise multiplier
into each task, and the worker clips its float delta and adds fresh Gaussian noise before
quantizing it. Pure: no broker."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from torch import nn

from coordinator.config import CoordinatorConfig
from coordinator.tasks import Latest, TaskMaker
from shared.app import PartitionSpec
from shared.codec import decode, encode, open_envelope
from shared.errors import ConfigError
from shared.messages import Task
from shared.quantize import decode_delta
from shared.settings import Settings
from shared.signing import Keyring, Role, Signer
from shared.store import LocalStore, ModelStore
from shared.tensors import FlatModel
from tests.support.messages import make_task
from tests.support.tiny import LinearApp
from worker.training import privatize, train_task, with_floor

SIGNER = Signer.generate()


class NormApp(LinearApp):
    """The tiny app with a BatchNorm layer: its model has an integer counter beside the floats."""

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))


def a_task(app: LinearApp, dp_clip: float = 0.0, dp_noise: float = 0.0) -> Task:
    model = FlatModel.from_state_dict(app.build_model(0).state_dict()).to_bytes()
    task = make_task(SIGNER, task_id="dp-task", model=model)[0]
    return dataclasses.replace(task, dp_clip=dp_clip, dp_noise=dp_noise)


def trained(app: LinearApp, task: Task) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The decoded float and exact parts of the task's update, and its metrics."""
    outcome = train_task(app, app.load_partition(PartitionSpec(0, 1)), task, task.model)
    spec = FlatModel.from_bytes(task.model).spec
    floats, exact = decode_delta(outcome.delta, spec, task.quant, task.block)
    return floats, exact, outcome.metrics


def test_without_noise_the_delta_is_clipped_to_the_norm() -> None:
    app = NormApp()
    free, free_exact, metrics = trained(app, a_task(app))
    assert "dp_clip_scale" not in metrics
    clip = 0.1 * float(torch.linalg.vector_norm(free))
    floats, exact, metrics = trained(app, a_task(app, dp_clip=clip))
    assert math.isclose(float(torch.linalg.vector_norm(floats)), clip, rel_tol=0.02)
    assert free_exact.abs().sum() > 0 and not exact.abs().sum()  # the counters stay behind
    # nothing un-noised travels in the metrics: no loss, no norm, no clip factor, no seed
    assert set(metrics) == {"train_seconds", "cpu_seconds"}  # its cost only
    # A clip above the delta's norm leaves it as it was.
    floats, _, _ = trained(app, a_task(app, dp_clip=100 * clip))
    assert torch.allclose(floats, free, atol=1e-2 * float(free.abs().max()))


def test_the_noise_is_fresh_each_time_the_same_task_is_trained() -> None:
    app = NormApp()
    task = a_task(app, dp_clip=1.0, dp_noise=0.5)
    (first, exact_1, _), (second, exact_2, _) = trained(app, task), trained(app, task)
    assert not torch.equal(first, second)
    assert torch.equal(exact_1, exact_2)
    # Without local DP the same task trains to the same bytes: the difference is the noise's.
    plain = a_task(app)
    assert torch.equal(trained(app, plain)[0], trained(app, plain)[0])


def test_the_noise_has_std_noise_times_clip_on_every_float() -> None:
    delta = torch.zeros(20_000)
    private, scale = privatize(delta, 2.0, 0.5)
    assert scale == 1.0 and delta.abs().sum() == 0  # the input is not changed in place
    assert math.isclose(float(private.std()), 1.0, rel_tol=0.03)
    for clip, noise in ((0.0, 1.0), (-1.0, 0.0), (math.nan, 1.0), (1.0, -0.5), (1.0, math.inf)):
        with pytest.raises(ValueError, match="local DP"):
            privatize(delta, clip, noise)


def test_a_task_round_trips_the_dp_fields_and_one_without_them_reads_as_off() -> None:
    ring = Keyring()
    ring.add(SIGNER.public, Role.COORDINATOR)
    task = a_task(LinearApp(), dp_clip=0.5, dp_noise=1.1)
    assert decode(encode(task, SIGNER), ring)[0] == task
    old = encode(a_task(LinearApp()), SIGNER)  # off: left off the wire, as before the fields
    head: dict[str, Any] = msgpack.unpackb(open_envelope(old).head)
    assert not {"dp_clip", "dp_noise"} & set(head)
    got = decode(old, ring)[0]
    assert isinstance(got, Task) and (got.dp_clip, got.dp_noise) == (0.0, 0.0)


async def test_the_coordinator_signs_the_clip_and_noise_into_its_tasks_when_on(tmp_path: Path) -> None:
    off = CoordinatorConfig.from_settings(Settings(job="j1", dp_clip=1.0))
    assert (off.dp_clip, off.dp_noise) == (0.0, 0.0)  # --dp-clip alone is the aggregator's DP
    on = CoordinatorConfig.from_settings(Settings(job="j1", dp_local=True, dp_clip=1.0, dp_noise=0.7))
    assert (on.dp_clip, on.dp_noise) == (1.0, 0.7)
    blob = FlatModel.from_state_dict(LinearApp().build_model(0).state_dict()).to_bytes()
    latest = Latest(0, "0" * 64, "k", blob)
    task = await TaskMaker(on, ModelStore(LocalStore(tmp_path), "j1")).make(latest, "cpu", -1, 60, 0.0)
    assert (task.dp_clip, task.dp_noise) == (1.0, 0.7)


def test_the_coordinator_refuses_local_dp_without_a_usable_clip() -> None:
    with pytest.raises(ConfigError, match="--dp-local needs --dp-clip"):
        CoordinatorConfig.from_settings(Settings(job="j1", dp_local=True))
    for bad in ({"dp_clip": 0.0}, {"dp_clip": math.inf}, {"dp_clip": 1.0, "dp_noise": -1.0}):
        with pytest.raises(ConfigError):
            CoordinatorConfig.from_settings(Settings(job="j1", dp_local=True, **bad))  # type: ignore[arg-type]


def test_a_workers_floor_takes_the_smaller_clip_and_the_larger_noise() -> None:
    app = NormApp()
    asked = a_task(app, dp_clip=1.0, dp_noise=0.5)
    assert with_floor(asked, None) is asked
    floored = with_floor(asked, (0.2, 0.3))
    assert (floored.dp_clip, floored.dp_noise) == (0.2, 0.5)
    loose = with_floor(asked, (5.0, 2.0))
    assert (loose.dp_clip, loose.dp_noise) == (1.0, 2.0)
    none_asked = with_floor(a_task(app), (0.2, 0.3))
    assert (none_asked.dp_clip, none_asked.dp_noise) == (0.2, 0.3)
    free, _, _ = trained(app, a_task(app))
    clip = 0.1 * float(torch.linalg.vector_norm(free))
    floats, _, _ = trained(app, with_floor(a_task(app), (clip, 1e-9)))
    assert math.isclose(float(torch.linalg.vector_norm(floats)), clip, rel_tol=0.02)
