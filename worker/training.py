"""One task's training, run off the event loop: load the base model, train, quantize the delta.

And the worker's warm-up before it first says hello: one tiny pass that pays the process's
one-time start-up costs outside any job's clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from shared.app import App, make_optimizer
from shared.messages import Task, TrainConfig
from shared.quantize import encode_delta
from shared.tensors import FlatModel

# What every update's metrics carry, under local DP too: the task's cost to its worker, not its data's
# (wall and CPU seconds of training from ``train_task``; the bytes it took in, added by the worker).
COST_METRICS = frozenset({"train_seconds", "cpu_seconds", "bytes_down"})


@dataclass(frozen=True)
class TrainingOutcome:
    delta: bytes
    num_samples: int
    metrics: dict[str, float]


class Stream(StrEnum):
    """The task's random streams, each seeded on its own so that none shares another's draws."""

    TRAIN = "train"  # the app's training (the shuffle)
    QUANTIZE = "quantize"  # the stochastic rounding of the delta


def seed_of(task_id: str, stream: Stream) -> int:
    """A 63-bit seed for ``stream`` of a task: sha256 of the stream's name and the task id, so any
    task id (hex or not) has seeds of its own, and the same id always has the same ones."""
    digest = hashlib.sha256(f"fedq/{stream.value}\0{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def train_task(
    app: App, data: Any, task: Task, model_blob: bytes, model_seed: int = 0, threads: int = 1
) -> TrainingOutcome:
    """Pure CPU work: no broker, no loop. Deterministic for a task id and base model.

    Its metrics always carry ``train_seconds`` (wall) and ``cpu_seconds`` (``cpu_time``), for
    ``fedq cost``."""
    started = time.perf_counter()
    cpu_started = cpu_time(threads)
    torch.set_num_threads(threads)  # per OS thread: must be set in the thread that trains
    base = FlatModel.from_bytes(model_blob)
    model = app.build_model(model_seed)
    model.load_state_dict(base.to_state_dict())
    result = app.train(model, data, task.train, seed_of(task.task_id, Stream.TRAIN))
    local = FlatModel.from_state_dict(model.state_dict())
    if local.spec != base.spec:
        raise ValueError("the app's model does not match the task's model spec")
    d_float = local.floats - base.floats
    d_exact = local.exact - base.exact
    metrics = dict(result.metrics)
    private = bool(task.dp_clip or task.dp_noise)
    if private:  # integer tensors (batch counters) count the worker's samples: they stay behind
        d_float, _ = privatize(d_float, task.dp_clip, task.dp_noise)
        d_exact = torch.zeros_like(d_exact)
    gen = torch.Generator().manual_seed(seed_of(task.task_id, Stream.QUANTIZE))
    payload = encode_delta(d_float, d_exact, base.spec, task.quant, task.block, gen)
    if private:
        # The metrics travel with the update un-noised: the loss and the delta's norm (or its clip
        # factor, C / norm) are the private data's. Under local DP only the time goes.
        metrics = {}
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["cpu_seconds"] = cpu_time(threads) - cpu_started
    if not private:
        metrics["delta_norm"] = float(torch.linalg.vector_norm(d_float))
    return TrainingOutcome(payload, result.num_samples, metrics)


def cpu_time(threads: int) -> float:
    """CPU seconds to measure training by: this thread's with one torch thread (torch then runs
    in the calling thread, and ``--replicas`` in one process do not count each other's), the whole
    process's with more (torch's own threads do the work; replicas are then counted together)."""
    return time.thread_time() if threads <= 1 else time.process_time()


def with_floor(task: Task, floor: tuple[float, float] | None) -> Task:
    """``task`` with this worker's own local DP applied on top of what it asks: the smaller clip
    and the larger noise multiplier (``--dp-floor-clip``, ``--dp-floor-noise``), so a coordinator
    cannot switch a worker's privacy off. ``None``: the task as it is."""
    if floor is None:
        return task
    clip, noise = floor
    return dataclasses.replace(
        task, dp_clip=min(task.dp_clip, clip) if task.dp_clip > 0 else clip, dp_noise=max(task.dp_noise, noise)
    )


def privatize(d_float: torch.Tensor, clip: float, noise: float) -> tuple[torch.Tensor, float]:
    """Local differential privacy on a float delta: scale it to L2 norm at most ``clip``, then add
    Gaussian noise of std ``noise`` x ``clip`` to every coordinate; the delta and the clip factor
    (1 when the norm was within ``clip``). The noise comes from the OS's randomness, never from a
    seed the task id gives: whoever knows a seed can subtract the noise."""
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"local DP needs a finite clip above 0 and noise of 0 or more, not {clip} and {noise}")
    norm = float(torch.linalg.vector_norm(d_float, dtype=torch.float64))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    private = d_float * scale if scale < 1.0 else d_float.clone()
    if noise > 0:
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        private += torch.randn(d_float.shape, generator=gen, dtype=d_float.dtype) * (noise * clip)
    return private, scale


WARM_UP_SAMPLES = 4
_warm_lock = threading.Lock()
_warmed = False  # one warm-up per process: what it pays for is the process's, not the thread's


@dataclass(frozen=True)
class WarmUp:
    seconds: float
    how: str  # pass: forward, backward and a step on a few samples; app: the app's own warm_up;
    # optimizer: the data could not be sliced, so only the optimizer was built; skipped: warm already


def warm_up(app: App, data: Any, model_seed: int = 0, threads: int = 1) -> WarmUp:
    """Pay the process's one-time start-up before the worker counts as ready: the first optimizer
    (``torch.optim`` imports ``torch._dynamo`` then, about 1.5 s of CPU), autograd and the
    allocator. Run it in the thread that trains. One forward/backward pass of the app's model on a
    few samples of ``data`` and one optimizer step, all on a throwaway model; the global RNG is
    restored afterwards, so no training result changes. Once per process: later calls return
    ``skipped`` at once (after waiting for a warm-up under way). An app may provide
    ``warm_up(model, data)`` to run its own pass instead."""
    global _warmed
    started = time.perf_counter()
    with _warm_lock:  # replicas wait for the one warm-up rather than say hello cold
        if _warmed:
            return WarmUp(time.perf_counter() - started, "skipped")
        torch.set_num_threads(threads)  # as train_task does, in the same thread
        with torch.random.fork_rng(devices=[]):
            model = app.build_model(model_seed)
            opt = make_optimizer(model, TrainConfig())
            model.train()
            custom = getattr(app, "warm_up", None)
            batch = None if callable(custom) else _few(data, WARM_UP_SAMPLES)
            if callable(custom):
                custom(model, data)
                how = "app"
            elif batch is not None:
                out = model(batch[0])
                out = out[0] if isinstance(out, tuple | list) else out
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    out.float().mean().backward()  # type: ignore[no-untyped-call]
                    opt.step()
                how = "pass"
            else:
                how = "optimizer"
            opt.zero_grad()
        _warmed = True
        return WarmUp(time.perf_counter() - started, how)


def _few(data: Any, n: int) -> tuple[torch.Tensor, ...] | None:
    """The first ``n`` rows of a tuple of tensors (``ClassificationApp``'s ``(x, y)``), else None."""
    if isinstance(data, torch.Tensor):
        data = (data,)
    if not isinstance(data, tuple | list) or not data:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) > 0 for t in data):
        return None
    return tuple(t[:n] for t in data)
