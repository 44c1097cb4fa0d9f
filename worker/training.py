"""One task's training, run off the event loop: load the base model, train, quantize the delta."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from shared.app import App
from shared.messages import Task
from shared.quantize import encode_delta
from shared.tensors import FlatModel


@dataclass(frozen=True)
class TrainingOutcome:
    delta: bytes
    num_samples: int
    metrics: dict[str, float]


def seed_of(task_id: str) -> int:
    return int(task_id[:15], 16) if all(c in "0123456789abcdef" for c in task_id[:15]) and task_id else 0


def train_task(
    app: App, data: Any, task: Task, model_blob: bytes, model_seed: int = 0, threads: int = 1
) -> TrainingOutcome:
    """Pure CPU work: no broker, no loop. Deterministic for a task id and base model."""
    started = time.perf_counter()
    torch.set_num_threads(threads)  # per OS thread: must be set in the thread that trains
    base = FlatModel.from_bytes(model_blob)
    model = app.build_model(model_seed)
    model.load_state_dict(base.to_state_dict())
    seed = seed_of(task.task_id)
    result = app.train(model, data, task.train, seed)
    local = FlatModel.from_state_dict(model.state_dict())
    if local.spec != base.spec:
        raise ValueError("the app's model does not match the task's model spec")
    d_float = local.floats - base.floats
    d_exact = local.exact - base.exact
    gen = torch.Generator().manual_seed(seed)
    payload = encode_delta(d_float, d_exact, base.spec, task.quant, task.block, gen)
    metrics = dict(result.metrics)
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["delta_norm"] = float(torch.linalg.vector_norm(d_float))
    return TrainingOutcome(payload, result.num_samples, metrics)
