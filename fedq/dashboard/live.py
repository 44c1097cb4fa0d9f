"""The broker's side of a live job: the job's queues looked at with passive declares (depth and
consumers; nothing is consumed or declared), every few seconds, from a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from broker_config.names import Names
from fedq.dashboard.data import QueueLook, Queues
from shared.settings import Settings
from shared.transport import Transport

SOURCE = "passive declares over AMQP (ready messages and consumers of each queue), every {every:g} s"


def job_queues(names: Names, capabilities: tuple[str, ...]) -> list[tuple[str, str]]:
    """The queues a job's health shows in: (queue, what it is for)."""
    return [
        *((names.task_queue(c), f"tasks {c}") for c in capabilities),
        (names.updates_queue, "updates"),
        (names.coordinator_queue, "coordinator"),
        (names.dead_queue, "dead letters"),
    ]


class QueueProbe:
    """Looks at the job's queues every ``every`` seconds while ``wanted()`` says so (a live job);
    ``latest`` is the last look, or why there is none."""

    def __init__(
        self, settings: Settings, wanted: Callable[[], bool] = lambda: True, every: float = 2.0
    ) -> None:
        self.settings = settings
        self.names = Names(settings.namespace, settings.job)
        self.queues = job_queues(self.names, settings.capability_list)
        self.wanted = wanted
        self.every = every
        self.source = SOURCE.format(every=every)
        self.latest = Queues(self.source, error="not looked at yet")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedq-dashboard-queues", daemon=True)

    def start(self) -> QueueProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        from shared.transport.connect import transport_for

        transport: Transport | None = None
        try:
            while not self._stop.is_set():
                if self.wanted():
                    try:
                        if transport is None:
                            transport = await transport_for(self.settings, "fedq-dashboard").connect()
                        self.latest = await self.look(transport)
                    except Exception as exc:  # a broker away, a refused login: shown, tried again
                        self.latest = Queues(
                            self.source, error=f"broker not reachable: {exc}", at=time.time()
                        )
                        if transport is not None:
                            with contextlib.suppress(Exception):
                                await transport.close(grace=0.5)
                        transport = None
                await asyncio.to_thread(self._stop.wait, self.every)
        finally:
            if transport is not None:
                with contextlib.suppress(Exception):
                    await transport.close(grace=0.5)

    async def look(self, transport: Transport) -> Queues:
        looks = []
        for queue, role in self.queues:
            info = await transport.queue_info(queue)
            looks.append(
                QueueLook(
                    queue,
                    role,
                    None if info is None else info.messages,
                    None if info is None else info.consumers,
                )
            )
        return Queues(self.source, tuple(looks), at=time.time())
