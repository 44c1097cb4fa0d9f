"""FedProx (``--prox-mu``): the proximal term ``make_optimizer`` adds to every app's local training,
its place in the signed recipe. A job that carries it through the real broker is in
tests/test_learning_jobs.py."""

from __future__ import annotations

import hashlib
import math

import msgpack
import pytest
import torch
from torch import nn

from coordinator.config import CoordinatorConfig
from shared.app import PartitionSpec, make_optimizer
from shared.codec import decode, open_envelope
from shared.errors import ConfigError
from shared.messages import TrainConfig
from shared.settings import Settings
from shared.signing import Keyring, Role, Signer
from shared.tensors import FlatModel
from tests.support.messages import make_task
from tests.support.tiny import LinearApp

RECIPE = TrainConfig(epochs=5, batch_size=8, lr=0.1, momentum=0.9)


def trained(config: TrainConfig) -> tuple[FlatModel, FlatModel]:
    """The tiny app's model before and after one local training under ``config``."""
    app = LinearApp()
    model = app.build_model(0)
    base = FlatModel.from_state_dict(model.state_dict())
    app.train(model, app.load_partition(PartitionSpec(0, 1)), config, seed=7)
    return base, FlatModel.from_state_dict(model.state_dict())


def distance(a: FlatModel, b: FlatModel) -> float:
    return float(torch.linalg.vector_norm(a.floats - b.floats))


def test_the_proximal_term_keeps_the_local_model_nearer_its_base() -> None:
    base, free = trained(RECIPE)
    _, held = trained(TrainConfig(**{**RECIPE.__dict__, "prox_mu": 1.0}))
    assert 0 < distance(base, held) < 0.8 * distance(base, free)


def test_each_step_adds_mu_times_the_distance_from_the_base_to_the_gradient() -> None:
    """SGD without momentum, lr 1, a zero loss gradient: one step moves w by -mu (w - w_base)."""
    layer = nn.Linear(3, 2)
    start = [p.detach().clone() for p in layer.parameters()]
    opt = make_optimizer(layer, TrainConfig(lr=1.0, momentum=0.0, prox_mu=0.25))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, w0 in zip(layer.parameters(), start, strict=True):
        assert torch.allclose(p, w0 + 1.0 - 0.25 * 1.0)


def test_mu_zero_trains_to_the_bytes_of_plain_sgd() -> None:
    """The recipe without the term is untouched: the same bytes as torch's SGD in the same loop."""
    app = LinearApp()
    x, y = app.load_partition(PartitionSpec(0, 1))
    model = app.build_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum)
    gen = torch.Generator().manual_seed(7)
    for _ in range(RECIPE.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), RECIPE.batch_size):
            idx = perm[i : i + RECIPE.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            opt.step()
    plain = FlatModel.from_state_dict(model.state_dict()).to_bytes()
    _, ours = trained(RECIPE)
    assert hashlib.sha256(ours.to_bytes()).digest() == hashlib.sha256(plain).digest()


def test_the_coordinator_signs_prox_mu_into_the_recipe_and_refuses_a_bad_one() -> None:
    assert CoordinatorConfig.from_settings(Settings(job="j1")).train.prox_mu == 0.0
    assert CoordinatorConfig.from_settings(Settings(job="j1", prox_mu=0.01)).train.prox_mu == 0.01
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="--prox-mu"):
            CoordinatorConfig.from_settings(Settings(job="j1", prox_mu=bad))
    with pytest.raises(ConfigError):
        make_optimizer(nn.Linear(2, 2), TrainConfig(prox_mu=-1.0))


def test_the_recipe_round_trips_prox_mu_and_a_recipe_without_it_reads_as_zero() -> None:
    signer = Signer.generate()
    ring = Keyring()
    ring.add(signer.public, Role.COORDINATOR)
    task, raw = make_task(signer, train=TrainConfig(prox_mu=0.01))
    assert decode(raw, ring)[0] == task
    _, old = make_task(signer)  # mu 0 is left off the wire: what a coordinator from before it sent
    head = msgpack.unpackb(open_envelope(old).head)
    assert "prox_mu" not in head["train"]
    assert decode(old, ring)[0].train.prox_mu == 0.0  # type: ignore[union-attr]
