"""One task's training (worker.training.train_task): its random streams come from the task id,
one per use, so any two tasks draw differently and the same task always draws the same."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import worker.training as training
from shared.app import PartitionSpec, TrainResult
from shared.messages import Task, TrainConfig
from shared.quantize import encode_delta
from shared.signing import Signer
from shared.tensors import FlatModel
from tests.support.messages import make_task
from tests.support.tiny import LinearApp
from worker.training import Stream, seed_of, train_task

TRAIN = TrainConfig(epochs=1, batch_size=16)
SIGNER = Signer.generate()


def task(app: LinearApp, task_id: str) -> Task:
    model = FlatModel.from_state_dict(app.build_model(0).state_dict()).to_bytes()
    return make_task(SIGNER, task_id=task_id, model=model, train=TRAIN)[0]


@pytest.mark.parametrize(
    "ids", [("job-a-1", "job-a-2"), ("TASK1", "TASK2"), ("x", "y"), ("0" * 32, "1" * 32)]
)
def test_tasks_with_any_ids_draw_their_own_noise_and_shuffle(ids: tuple[str, str]) -> None:
    app = LinearApp()
    data = app.load_partition(PartitionSpec(0, 1))
    first, second = (task(app, i) for i in ids)
    assert (
        train_task(app, data, first, first.model).delta != train_task(app, data, second, second.model).delta
    )
    for stream in Stream:
        assert seed_of(ids[0], stream) != seed_of(ids[1], stream)


def test_the_same_task_trains_to_the_same_bytes() -> None:
    app = LinearApp()
    data = app.load_partition(PartitionSpec(0, 1))
    t = task(app, "not-hex-at-all")
    assert train_task(app, data, t, t.model).delta == train_task(app, data, t, t.model).delta
    assert seed_of("not-hex-at-all", Stream.TRAIN) == seed_of("not-hex-at-all", Stream.TRAIN)


class SeedSpy(LinearApp):
    """Records the seed each training was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seeds: list[int] = []

    def train(self, model: nn.Module, data: Any, config: TrainConfig, seed: int) -> TrainResult:
        self.seeds.append(seed)
        return super().train(model, data, config, seed)


def test_quantization_noise_is_not_the_training_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator that rounds the delta does not replay the draws the training was seeded with."""
    app = SeedSpy()
    data = app.load_partition(PartitionSpec(0, 1))
    rounding: list[torch.Tensor] = []

    def spy(*args: Any) -> bytes:
        gen = args[-1]
        assert isinstance(gen, torch.Generator)
        rounding.append(torch.rand(64, generator=torch.Generator().set_state(gen.get_state())))
        return encode_delta(*args)

    monkeypatch.setattr(training, "encode_delta", spy)
    for task_id in ("0123456789abcdef" * 2, "job-7"):
        t = task(app, task_id)
        train_task(app, data, t, t.model)
    assert len(app.seeds) == len(rounding) == 2
    for seed, noise in zip(app.seeds, rounding, strict=True):
        assert not torch.equal(noise, torch.rand(64, generator=torch.Generator().manual_seed(seed)))
