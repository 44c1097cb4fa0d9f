"""A tiny app and waiting helpers for tests that run services in the test's own process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from shared.app import ClassificationApp

WAIT = 10.0  # seconds any single expectation may take before the test fails


class LinearApp(ClassificationApp):
    """Four features, three classes: a linear model, evaluated in no time."""

    name = "linear"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(4, 3)

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(48, 4, generator=gen), torch.randint(0, 3, (48,), generator=gen)

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_data()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


async def until(check: Callable[[], Any], what: str, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
