"""The tiny app the in-process service tests train: four features, three classes, a linear model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shared.app import ClassificationApp, TrainResult
from shared.messages import TrainConfig


class LinearApp(ClassificationApp):
    """A linear model, trained and evaluated in no time. It counts its trainings (``trained``);
    ``train_seconds`` makes each last (in the training thread, as long local training would),
    ``fail`` makes each raise, and ``then`` runs after each (in the training thread too)."""

    name = "linear"

    def __init__(self, *, train_seconds: float = 0.0, fail: bool = False) -> None:
        self.train_seconds = train_seconds
        self.fail = fail
        self.trained = 0
        self.then: Callable[[], object] = lambda: None

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(4, 3)

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(48, 4, generator=gen), torch.randint(0, 3, (48,), generator=gen)

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_data()

    def train(self, model: nn.Module, data: Any, config: TrainConfig, seed: int) -> TrainResult:
        self.trained += 1
        if self.fail:
            raise RuntimeError("this app cannot train")
        time.sleep(self.train_seconds)
        result = super().train(model, data, config, seed)
        self.then()
        return result
