"""The plug-in point: a user's app provides the model, private data, local training and evaluation.

fedq loads an app from ``module:object`` (``--app``). Most users subclass
``ClassificationApp`` and provide three methods; anything with the ``App``
methods works.
"""

from __future__ import annotations

import importlib
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from shared.errors import AppError, ConfigError
from shared.messages import TrainConfig
from shared.partition import dirichlet_partition, load_partition_file


@dataclass(frozen=True)
class PartitionSpec:
    """Which share of the data a worker holds: ``index`` of ``count``."""

    index: int
    count: int
    alpha: float = 0.5
    seed: int = 42
    file: str = ""


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class App(Protocol):
    """What fedq asks of an app. ``train`` follows the task's recipe (``config``): an app that
    builds its own optimizer instead of calling ``make_optimizer`` must honour
    ``config.prox_mu`` itself, adding (mu/2)||w - w_base||^2 to its loss (or mu (w - w_base)
    to its gradients), w_base being the model as ``train`` receives it."""

    name: str

    def build_model(self, seed: int) -> nn.Module: ...

    def load_partition(self, part: PartitionSpec) -> Any: ...

    def train(self, model: nn.Module, data: Any, config: TrainConfig, seed: int) -> TrainResult: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


def load_app(spec: str) -> App:
    """Import ``module:object``; a class is instantiated, an instance is used as is."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"app {spec!r} must look like module:object")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppError(f"cannot import app module {module_name!r}: {exc}") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise AppError(f"module {module_name!r} has no attribute {attr!r}")
    app = obj() if isinstance(obj, type) else obj
    missing = [m for m in ("build_model", "load_partition", "train", "evaluate") if not hasattr(app, m)]
    if missing:
        raise AppError(f"app {spec!r} lacks {', '.join(missing)}")
    return app  # type: ignore[no-any-return]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s parameters. With ``config.prox_mu`` > 0 it is
    FedProx's: each step first adds mu (w - w_base) to each gradient, the gradient of
    (mu/2)||w - w_base||^2, w_base being the parameters as they are now (the task's base model)."""
    opt: torch.optim.Optimizer
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise AppError(f"unknown optimizer {config.optimizer!r}; use sgd or adam")
    if config.prox_mu:
        add_proximal_term(opt, config.prox_mu)
    return opt


def add_proximal_term(opt: torch.optim.Optimizer, mu: float) -> None:
    """FedProx on any optimizer: before each step, mu (w - w_anchor) joins the gradient of each
    parameter that has one, w_anchor being a copy of the parameters taken now."""
    if not math.isfinite(mu) or mu < 0:
        raise ConfigError(f"the proximal term's mu must be finite and 0 or more, not {mu}")
    anchors = {
        p: p.detach().clone() for group in opt.param_groups for p in group["params"] if p.requires_grad
    }

    def pull_to_anchor(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            for p, anchor in anchors.items():
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=mu)

    opt.register_step_pre_hook(pull_to_anchor)


_split_lock = threading.Lock()  # replicas load their partitions from several threads at once


class ClassificationApp:
    """Supervised classification on in-memory tensors.

    Subclasses provide ``build_model(seed)``, ``train_data()`` and ``test_data()``
    (each ``(x, y)`` tensors); partitioning, training and evaluation are done here.
    """

    name = "classification"

    def build_model(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Make the data once (``fedq run`` calls this before starting workers)."""
        self.train_data()
        self.test_data()

    def load_partition(self, part: PartitionSpec) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.train_data()
        if part.file:
            parts = load_partition_file(Path(part.file), part.count, len(y), part.index)
        else:
            parts = self._split(part.count, part.alpha, part.seed)
        idx = torch.tensor(parts[part.index], dtype=torch.int64)
        return x[idx], y[idx]

    def _split(self, count: int, alpha: float, seed: int) -> list[list[int]]:
        """The Dirichlet split, made once per process: the replicas of a ``--replicas`` worker
        each take their share of the same split instead of each making it again."""
        key = (count, alpha, seed)
        splits: dict[tuple[int, float, int], list[list[int]]] = self.__dict__.setdefault("_splits", {})
        with _split_lock:
            if key not in splits:
                splits[key] = dirichlet_partition(self.train_data()[1].numpy(), count, alpha, seed)
        return splits[key]

    def train(
        self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, seed: int
    ) -> TrainResult:
        x, y = data
        gen = torch.Generator().manual_seed(seed)
        opt = make_optimizer(model, config)
        model.train()
        total, batches = 0.0, 0
        for _ in range(config.epochs):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), config.batch_size):
                idx = perm[i : i + config.batch_size]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                total += loss.detach().item()
                batches += 1
        return TrainResult(len(y), {"train_loss": total / max(batches, 1)})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.test_data()
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(nn.functional.cross_entropy(logits, y))
            acc = float((logits.argmax(1) == y).float().mean())
        return {"accuracy": acc, "loss": loss}
