"""The shared service runtime on the in-memory transport: messages are checked once before a
handler sees them, a handler's error costs that message only, infrastructure failures and failing
loops stop the service, and every stop goes through one shutdown path."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from broker_config.names import REASON_HEADER, Names
from broker_config.topology import Topology, topology
from shared.codec import Envelope, encode
from shared.errors import ServiceFailure, StoreError, WireError
from shared.messages import Hello, Message
from shared.reasons import Reason
from shared.runtime import Runtime, Service
from shared.signing import Keyring, Role, Signer
from shared.transport import Delivery
from shared.transport.memory import MemoryBroker, MemoryTransport
from tests.support.waiting import WAIT, until


class Probe(Service):
    """A service whose handler does what the test says with each hello it is given."""

    name = "probe"

    def __init__(self, names: Names, keyring: Keyring, act: Callable[[Hello], Awaitable[None]]) -> None:
        self.names = names
        self.keyring = keyring
        self.act = act
        self.seen: list[str] = []
        self.stopped = 0
        self.loops: list[tuple[str, Callable[[], Awaitable[Any]]]] = []

    def topology(self) -> Topology:
        return topology(self.names)

    async def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        await runtime.consume_messages(self.names.updates_queue, Hello, self.keyring, self.handle, prefetch=4)
        for name, loop in self.loops:
            runtime.spawn(name, loop)

    async def handle(self, message: Message, envelope: Envelope, delivery: Delivery) -> None:
        assert isinstance(message, Hello)
        self.seen.append(message.worker_id)
        await self.act(message)
        await delivery.ack()

    async def stopping(self) -> None:
        self.stopped += 1


class World:
    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.names = Names(f"rt-{uuid.uuid4().hex[:8]}")
        self.keyring = Keyring()
        self.keys: dict[str, Signer] = {}  # each worker id's enrolled key, made on first use

    async def client(self) -> MemoryTransport:
        return await MemoryTransport(self.broker, self.names, "test").connect()

    async def send(self, client: MemoryTransport, worker_id: str, signer: Signer | None = None) -> None:
        if signer is None and worker_id not in self.keys:
            self.keys[worker_id] = Signer.generate()
            self.keyring.add(self.keys[worker_id].public, Role.WORKER, worker_id=worker_id)
        signer = signer or self.keys[worker_id]
        hello = Hello(worker_id, ("cpu",), signer.fingerprint, "up", 0.0)
        body = encode(hello, signer)
        await client.publish(self.names.results_exchange, self.names.results_key, body)

    async def dead(self, client: MemoryTransport) -> list[str]:
        reasons = []
        async with client.queue_pass(self.names.dead_queue) as p:
            while (held := await p.take()) is not None:
                reasons.append(str(held.headers.get(REASON_HEADER)))
                await p.ack(held)
        return reasons


async def started(world: World, probe: Probe, stop: asyncio.Event | None = None) -> asyncio.Task[Any]:
    transport = await MemoryTransport(world.broker, world.names, "probe").connect()
    running = asyncio.create_task(Runtime(transport).run(probe, stop))
    for _ in range(200):
        q = world.broker.queues.get(world.names.updates_queue)
        if (q is not None and q.consumers) or running.done():
            break
        await asyncio.sleep(0.01)
    return running


async def ok(_: Hello) -> None:
    pass


async def test_invalid_messages_never_reach_the_handler_and_are_dead_lettered_with_their_reason() -> None:
    world = World()
    probe = Probe(world.names, world.keyring, ok)
    running = await started(world, probe)
    client = await world.client()
    await client.publish(world.names.results_exchange, world.names.results_key, b"not an envelope")
    await world.send(client, "stranger", signer=Signer.generate())
    await world.send(client, "w1")
    await until(lambda: probe.seen == ["w1"], "the valid hello handled")
    assert sorted(await world.dead(client)) == [Reason.UNDECODABLE, Reason.UNKNOWN_SIGNER]
    assert not running.done()
    running.cancel()


async def test_a_handler_error_dead_letters_that_message_only_and_the_service_goes_on() -> None:
    world = World()

    async def act(hello: Hello) -> None:
        if hello.worker_id == "bad":
            raise IsADirectoryError("jobs/x/updates/")

    probe = Probe(world.names, world.keyring, act)
    running = await started(world, probe)
    client = await world.client()
    await world.send(client, "bad")
    await world.send(client, "good")
    await until(lambda: probe.seen == ["bad", "good"], "both hellos handled")
    assert await world.dead(client) == [Reason.INTERNAL_ERROR]
    info = await client.queue_info(world.names.updates_queue)
    assert info is not None and info.messages == 0  # the good one was acked, the bad one is not back
    assert not running.done()
    running.cancel()


@pytest.mark.parametrize("error", [StoreError("the store is gone"), ServiceFailure("cannot go on")])
async def test_an_infrastructure_failure_stops_the_service_and_gives_the_message_back(error: Exception) -> None:
    world = World()

    async def act(_: Hello) -> None:
        raise error

    probe = Probe(world.names, world.keyring, act)
    running = await started(world, probe)
    client = await world.client()
    await world.send(client, "w1")
    with pytest.raises(type(error), match=str(error)):
        await asyncio.wait_for(running, WAIT)
    assert probe.stopped == 1
    assert await world.dead(client) == []
    info = await client.queue_info(world.names.updates_queue)
    assert info is not None and info.messages == 1  # for a restart or a standby


async def test_a_failing_loop_stops_the_service_with_its_error() -> None:
    world = World()
    probe = Probe(world.names, world.keyring, ok)

    async def broken() -> None:
        await asyncio.sleep(0.02)
        raise RuntimeError("loop broke")

    probe.loops.append(("broken", broken))
    running = await started(world, probe)
    with pytest.raises(RuntimeError, match="loop broke"):
        await asyncio.wait_for(running, WAIT)
    assert probe.stopped == 1


async def test_finish_returns_its_result_and_cancels_the_loops() -> None:
    world = World()
    probe = Probe(world.names, world.keyring, ok)
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def done_soon() -> None:
        await asyncio.sleep(0.02)
        probe.runtime.finish("target_accuracy")

    probe.loops += [("forever", forever), ("done", done_soon)]
    running = await started(world, probe)
    assert await asyncio.wait_for(running, WAIT) == "target_accuracy"
    assert cancelled.is_set() and probe.stopped == 1


async def test_a_stop_event_stops_cleanly() -> None:
    world = World()
    probe = Probe(world.names, world.keyring, ok)
    stop = asyncio.Event()
    running = await started(world, probe, stop)
    stop.set()
    assert await asyncio.wait_for(running, WAIT) is None
    assert probe.stopped == 1


async def test_a_wire_error_handler_may_choose_to_ack() -> None:
    """``on_invalid`` decides: the coordinator logs and acks hellos it cannot read."""
    world = World()
    probe = Probe(world.names, world.keyring, ok)
    seen: list[str] = []

    async def log_and_ack(delivery: Delivery, error: WireError) -> None:
        seen.append(error.reason)
        await delivery.ack()

    async def start(runtime: Runtime) -> None:
        await runtime.consume_messages(
            world.names.updates_queue, Hello, world.keyring, probe.handle, prefetch=4, on_invalid=log_and_ack
        )

    probe.start = start  # type: ignore[method-assign]
    running = await started(world, probe)
    client = await world.client()
    await client.publish(world.names.results_exchange, world.names.results_key, b"junk")
    await until(lambda: seen == [Reason.UNDECODABLE], "the junk seen")
    assert await world.dead(client) == []
    running.cancel()
