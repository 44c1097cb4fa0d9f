"""A worker warms up before its first hello: one tiny pass, once per process, in the thread it
trains in, that changes no training result. Workers run here in the test's process on the
in-memory broker."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

import worker.training as training
from shared.app import PartitionSpec
from shared.messages import Task, TrainConfig
from shared.signing import Signer
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.memory import MemoryTransport
from tests.support.messages import make_task
from tests.support.rigs import worker_rig
from tests.support.tiny import LinearApp
from tests.support.waiting import events, until
from worker.training import train_task, warm_up

JOB = "job"  # the job of these tests' tasks; the names fixture takes it too
TRAIN = TrainConfig(epochs=2, batch_size=16)


class SpyApp(LinearApp):
    """Records, with the thread it ran in, every model built and every forward and backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []

    def build_model(self, seed: int) -> nn.Module:
        self.seen.append(("build", threading.get_ident()))
        model = super().build_model(seed)
        spy = self

        def forward_hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            spy.seen.append(("forward", threading.get_ident()))
            if out.requires_grad:
                out.register_hook(lambda grad: spy.seen.append(("backward", threading.get_ident())))

        model.register_forward_hook(forward_hook)
        return model


def task_for(signer: Signer, app: LinearApp, task_id: str | None = None) -> tuple[Task, bytes]:
    """A task of two epochs on version 0 of ``app``'s model."""
    model = FlatModel.from_state_dict(app.build_model(0).state_dict()).to_bytes()
    return make_task(signer, task_id=task_id, job_id=JOB, model=model, train=TRAIN)


@pytest.fixture
def cold_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this process had not warmed up yet (the warm-up runs once per process)."""
    monkeypatch.setattr(training, "_warmed", False)


async def test_worker_warms_up_in_its_training_thread_before_its_first_hello(
    mem: MemoryTransport, tmp_path: Path, cold_process: None
) -> None:
    app = SpyApp()
    seen_at_hello: list[list[tuple[str, int]]] = []

    async def on_hello(delivery: Delivery) -> None:
        await delivery.ack()
        seen_at_hello.append(list(app.seen))

    await mem.subscribe(mem.names.workers_exchange, (mem.names.hello_key,), on_hello)
    async with worker_rig(mem, tmp_path, app=app, warm=True) as rig:
        await rig.start()
        await until(lambda: seen_at_hello, "the worker's first hello")
        first = seen_at_hello[0]
        kinds = [kind for kind, _ in first]
        assert kinds == ["build", "forward", "backward"], first  # warmed up, and before the hello
        assert rig.worker.warmed is not None and rig.worker.warmed.how == "pass"
        warm_thread = first[0][1]
        assert warm_thread != threading.get_ident()  # off the event loop

        task, body = task_for(rig.coordinator, LinearApp())
        app.seen.clear()
        await rig.send(body)
        update, _ = await rig.next_update()
        assert {thread for _, thread in app.seen} == {warm_thread}  # trained where it warmed up
        # the warm-up changed nothing: the same task trained here, in a warm process, gives the same bytes
        data = app.load_partition(PartitionSpec(0, 1))
        assert update.delta == train_task(LinearApp(), data, task, task.model).delta


class DropoutApp(LinearApp):
    """Training draws from torch's global RNG (dropout), and building a model does too (no seed):
    a warm-up that left the global RNG elsewhere would change the trained update."""

    def build_model(self, seed: int) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_warm_up_leaves_the_training_result_unchanged(cold_process: None) -> None:
    app = DropoutApp()
    data = app.load_partition(PartitionSpec(0, 1))
    task, _ = task_for(Signer.generate(), app, "0123456789abcdef" * 2)
    blob = task.model

    torch.manual_seed(7)
    without = train_task(app, data, task, blob).delta
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    warmed = warm_up(app, data)
    assert warmed.how == "pass"
    assert torch.equal(torch.get_rng_state(), rng)
    assert train_task(app, data, task, blob).delta == without


def test_one_warm_up_per_process(cold_process: None) -> None:
    """--replicas M: M workers in one process; the first warms the process, the others skip."""
    app = SpyApp()
    data = app.load_partition(PartitionSpec(0, 1))
    results: list[training.WarmUp] = []
    threads = [threading.Thread(target=lambda: results.append(warm_up(app, data))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.how for r in results) == ["pass", "skipped", "skipped"]
    assert [kind for kind, _ in app.seen] == ["build", "forward", "backward"]


class WrongDataApp(LinearApp):
    """Its data has 5 features, for a model that takes 4: the warm-up pass fails."""

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(4, 5), torch.zeros(4, dtype=torch.int64)


async def test_a_failing_warm_up_does_not_stop_the_worker(
    mem: MemoryTransport, tmp_path: Path, cold_process: None
) -> None:
    hellos: list[bytes] = []

    async def on_hello(delivery: Delivery) -> None:
        await delivery.ack()
        hellos.append(delivery.body)

    await mem.subscribe(mem.names.workers_exchange, (mem.names.hello_key,), on_hello)
    with capture_logs() as logs:
        async with worker_rig(mem, tmp_path, app=WrongDataApp(), warm=True) as rig:
            await rig.start()
            await until(lambda: hellos, "the worker's first hello")
            assert events(logs, "warm_up_failed")
            rig.check_alive()
