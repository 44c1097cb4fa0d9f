"""The in-memory transport keeps the broker semantics services rely on (no RabbitMQ needed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker_config.names import Names
from broker_config.topology import (
    Binding,
    Exchange,
    Limits,
    Queue,
    Topology,
    coordinator_inbox,
    task_queue,
    topology,
)
from shared.errors import BrokerError, TopologyConflictError
from shared.transport import Delivery, QueueInfo
from shared.transport.memory import MemoryBroker, MemoryTransport, topic_matches
from tests.support.waiting import until

# ``mem`` (tests/conftest.py): the test's connection to a broker of its own, fedq's topology
# declared (delivery limits: 5 for tasks, 10 for updates)


async def info(t: MemoryTransport, queue: str) -> QueueInfo:
    found = await t.queue_info(queue)
    assert found is not None
    return found


async def bodies_in(t: MemoryTransport, queue: str) -> list[bytes]:
    """Take every message of ``queue`` in order, acking each."""
    out: list[bytes] = []
    async with t.queue_pass(queue) as p:
        while (held := await p.take()) is not None:
            out.append(held.body)
            assert await p.ack(held) is None
    return out


class Holder:
    """A handler that keeps its deliveries unsettled, for the test to settle."""

    def __init__(self) -> None:
        self.got: list[Delivery] = []

    async def __call__(self, d: Delivery) -> None:
        self.got.append(d)

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.got]


async def exchange_with_queues(t: MemoryTransport, kind: str, keys: dict[str, str]) -> None:
    await t.declare(
        Topology(
            (Exchange("x", kind),),
            tuple(Queue(q) for q in keys),
            tuple(Binding(q, "x", key) for q, key in keys.items()),
        )
    )


async def test_direct_routes_by_exact_key(mem: MemoryTransport) -> None:
    await exchange_with_queues(mem, "direct", {"a": "red", "b": "blue"})
    await mem.publish("x", "red", b"1")
    await mem.publish("x", "blue", b"2")
    await mem.publish("x", "red.more", b"3", mandatory=False)
    assert await bodies_in(mem, "a") == [b"1"]
    assert await bodies_in(mem, "b") == [b"2"]


async def test_fanout_copies_to_every_bound_queue(mem: MemoryTransport) -> None:
    await exchange_with_queues(mem, "fanout", {"a": "", "b": "ignored"})
    await mem.publish("x", "anything", b"1")
    assert await bodies_in(mem, "a") == [b"1"]
    assert await bodies_in(mem, "b") == [b"1"]


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("model.*", "model.j1", True),
        ("model.*", "model.j1.extra", False),
        ("model.*", "model", False),
        ("*.j1", "receipt.j1", True),
        ("#", "", True),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c", False),
        ("#.b.*", "x.y.b.c", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
    ],
)
def test_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


async def test_topic_exchange_routes_with_wildcards(mem: MemoryTransport) -> None:
    await exchange_with_queues(mem, "topic", {"one": "model.*", "all": "#", "deep": "model.#.x"})
    for key in ("model.j1", "model.a.b.x", "receipt.j1"):
        await mem.publish("x", key, key.encode())
    assert await bodies_in(mem, "one") == [b"model.j1"]
    assert await bodies_in(mem, "all") == [b"model.j1", b"model.a.b.x", b"receipt.j1"]
    assert await bodies_in(mem, "deep") == [b"model.a.b.x"]


async def test_default_exchange_routes_to_named_queue(mem: MemoryTransport) -> None:
    await mem.publish("", mem.names.dead_queue, b"direct to the queue")
    assert await bodies_in(mem, mem.names.dead_queue) == [b"direct to the queue"]


async def test_unroutable_and_unknown_exchange(mem: MemoryTransport) -> None:
    with pytest.raises(BrokerError, match="unroutable"):
        await mem.publish(mem.names.tasks_exchange, mem.names.task_key("no-such-capability"), b"x")
    await mem.publish(
        mem.names.tasks_exchange, mem.names.task_key("no-such-capability"), b"x", mandatory=False
    )  # dropped quietly
    with pytest.raises(BrokerError):
        await mem.publish("no.such.exchange", "", b"x")
    assert mem.bytes_published == 1  # only the accepted publish counts


async def test_publish_carries_properties_and_counts_bytes(mem: MemoryTransport) -> None:
    h = Holder()
    await mem.consume(mem.names.dead_queue, h, prefetch=1)
    before = time.time()
    await mem.publish("", mem.names.dead_queue, b"abcd", headers={"k": "v"}, message_id="m1")
    await until(lambda: h.got, "h.got", 1.0)
    d = h.got[0]
    assert (d.headers["k"], d.message_id, d.redelivered, d.source) == ("v", "m1", False, mem.names.dead_queue)
    assert d.timestamp is not None and before - 1 <= d.timestamp <= time.time()
    assert mem.bytes_published == 4


async def test_publish_before_connect_and_after_close(names: Names) -> None:
    t = MemoryTransport(MemoryBroker(), names)
    with pytest.raises(BrokerError, match="not connected"):
        await t.publish("", "q", b"x")
    await t.connect()
    await t.close()
    with pytest.raises(BrokerError, match="closed"):
        await t.publish("", "q", b"x")


async def test_prefetch_bounds_unsettled_deliveries(mem: MemoryTransport) -> None:
    h = Holder()
    await mem.consume(mem.names.dead_queue, h, prefetch=2)
    for i in range(5):
        await mem.publish("", mem.names.dead_queue, bytes([i]))
    await until(lambda: len(h.got) == 2, "len(h.got) == 2", 1.0)
    await asyncio.sleep(0.02)
    assert len(h.got) == 2
    assert (await info(mem, mem.names.dead_queue)).messages == 3
    assert await h.got[0].ack() is True
    await until(lambda: len(h.got) == 3, "len(h.got) == 3", 1.0)
    await asyncio.sleep(0.02)
    assert h.bodies == [b"\x00", b"\x01", b"\x02"]


async def test_retry_later_comes_back_first_and_redelivered(mem: MemoryTransport) -> None:
    h = Holder()
    await mem.consume(mem.names.dead_queue, h, prefetch=1)
    await mem.publish("", mem.names.dead_queue, b"first")
    await mem.publish("", mem.names.dead_queue, b"second")
    await until(lambda: len(h.got) == 1, "len(h.got) == 1", 1.0)
    await h.got[0].retry_later()
    await until(lambda: len(h.got) == 2, "len(h.got) == 2", 1.0)
    assert (h.got[1].body, h.got[1].redelivered) == (b"first", True)
    assert h.got[1].headers["x-delivery-count"] == 1  # a quorum queue counts the return
    await h.got[1].ack()
    await until(lambda: len(h.got) == 3, "len(h.got) == 3", 1.0)
    assert (h.got[2].body, h.got[2].redelivered) == (b"second", False)


async def test_delivery_limit_dead_letters(mem: MemoryTransport) -> None:
    """A task queue's limit is 5: the sixth return sends the message to the dead exchange."""
    seen: list[Delivery] = []

    async def always_retry(d: Delivery) -> None:
        seen.append(d)
        await d.retry_later()

    await mem.consume(mem.names.task_queue("cpu"), always_retry, prefetch=1)
    await mem.publish(mem.names.tasks_exchange, mem.names.task_key("cpu"), b"poison")
    await until(lambda: len(seen) == 6, "len(seen) == 6", 1.0)
    await until(lambda: mem.broker.queues[mem.names.dead_queue].ready, "a dead letter", 1.0)
    await asyncio.sleep(0.02)
    assert len(seen) == 6
    assert [d.redelivered for d in seen] == [False, *[True] * 5]
    async with mem.queue_pass(mem.names.dead_queue) as p:
        held = await p.take()
        assert held is not None and held.body == b"poison"
        assert held.headers["x-first-death-reason"] == "delivery_limit"
        assert held.headers["x-first-death-queue"] == mem.names.task_queue("cpu")
        assert held.headers["x-death"][0]["count"] == 1
        assert await p.take() is None
    assert (await info(mem, mem.names.task_queue("cpu"))).messages == 0


async def test_base_dead_letter_publishes_with_reason_and_acks(mem: MemoryTransport) -> None:
    h = Holder()
    await mem.consume(mem.names.task_queue("cpu"), h, prefetch=1)
    await mem.publish(mem.names.tasks_exchange, mem.names.task_key("cpu"), b"bad")
    await until(lambda: h.got, "h.got", 1.0)
    await h.got[0].dead_letter("undecodable", "garbage")
    async with mem.queue_pass(mem.names.dead_queue) as p:
        held = await p.take()
        assert held is not None and held.headers["x-fedq-reason"] == "undecodable"
        assert held.headers["x-fedq-source"] == mem.names.task_queue("cpu")


async def test_lost_link_redelivers_reconnects_and_loses_old_acks(mem: MemoryTransport) -> None:
    h = Holder()
    reconnects: list[int] = []
    forget = mem.on_reconnect(lambda: reconnects.append(1))
    await mem.consume(mem.names.task_queue("cpu"), h, prefetch=1)
    await mem.publish(mem.names.tasks_exchange, mem.names.task_key("cpu"), b"work")
    await until(lambda: h.got, "h.got", 1.0)
    old = h.got[0]
    await mem.lose_link()
    assert reconnects == [1]
    await until(lambda: len(h.got) == 2, "len(h.got) == 2", 1.0)  # the restored consumer gets it again
    assert (h.got[1].body, h.got[1].redelivered, h.got[1].headers["x-delivery-count"]) == (b"work", True, 1)
    assert await old.ack() is False  # its channel is gone
    assert await h.got[1].ack() is True
    assert (await info(mem, mem.names.task_queue("cpu"))).messages == 0
    forget()
    await mem.lose_link()
    assert reconnects == [1]


async def test_publish_waits_out_a_lost_link(mem: MemoryTransport) -> None:
    mem.broker.drop(mem)
    publish = asyncio.create_task(mem.publish("", mem.names.dead_queue, b"late"))
    await asyncio.sleep(0.02)
    assert not publish.done()
    await mem.reconnect()
    await publish
    assert await bodies_in(mem, mem.names.dead_queue) == [b"late"]
    mem.broker.drop(mem)
    mem.publish_retry_seconds = 0.02
    with pytest.raises(BrokerError, match="down"):
        await mem.publish("", mem.names.dead_queue, b"never")


async def test_single_active_consumer_takeover( mem: MemoryTransport) -> None:
    first, second = Holder(), Holder()
    other = await MemoryTransport(mem.broker, mem.names, "standby").connect()
    await mem.consume(mem.names.updates_queue, first, prefetch=10)
    await other.consume(mem.names.updates_queue, second, prefetch=10)
    for i in range(3):
        await mem.publish(mem.names.results_exchange, mem.names.results_key, bytes([i]))
    await until(lambda: len(first.got) == 3, "len(first.got) == 3", 1.0)
    assert second.got == []
    assert (await info(mem, mem.names.updates_queue)).consumers == 2
    await first.got[0].ack()
    await mem.close(grace=0.1)  # two unsettled go back, to the standby
    await until(lambda: len(second.got) == 2, "len(second.got) == 2", 1.0)
    assert [(d.body, d.redelivered) for d in second.got] == [(b"\x01", True), (b"\x02", True)]
    await other.publish(mem.names.results_exchange, mem.names.results_key, b"\x03")
    await until(lambda: len(second.got) == 3, "len(second.got) == 3", 1.0)
    assert second.got[2].body == b"\x03"
    await other.close(grace=0.1)


async def test_stream_offsets(mem: MemoryTransport) -> None:
    for i in range(3):
        await mem.publish(mem.names.results_exchange, mem.names.results_key, f"u{i}".encode())
    log = mem.names.update_log
    assert [e.offset for e in await mem.read_all(log, "first", idle=0.02)] == [0, 1, 2]
    assert [e.body for e in await mem.read_all(log, "last", idle=0.02)] == [b"u2"]
    assert [e.offset for e in await mem.read_all(log, 1, idle=0.02)] == [1, 2]
    assert await mem.read_all(log, "next", idle=0.02) == []
    assert [e.offset for e in await mem.read_all(log, "first", idle=0.02)] == [0, 1, 2]  # never consumed
    assert (await mem.read_all(log, 0, idle=0.02))[1].headers["x-stream-offset"] == 1


async def test_stream_next_sees_new_entries_and_ends_when_idle(mem: MemoryTransport) -> None:
    await mem.publish(mem.names.results_exchange, mem.names.results_key, b"old")

    async def later() -> None:
        await asyncio.sleep(0.03)
        await mem.publish(mem.names.results_exchange, mem.names.results_key, b"new")

    writer = asyncio.create_task(later())
    start = time.monotonic()
    entries = await mem.read_all(mem.names.update_log, "next", idle=0.1)
    elapsed = time.monotonic() - start
    await writer
    assert [(e.offset, e.body) for e in entries] == [(1, b"new")]
    assert 0.12 <= elapsed < 1.0  # waited for the new entry, then one idle period


async def test_consume_a_stream_from_an_offset(mem: MemoryTransport) -> None:
    for i in range(3):
        await mem.publish(mem.names.results_exchange, mem.names.results_key, bytes([i]))
    h = Holder()
    await mem.consume(mem.names.update_log, h, prefetch=10, arguments={"x-stream-offset": 1})
    await until(lambda: len(h.got) == 2, "len(h.got) == 2", 1.0)
    assert [d.headers["x-stream-offset"] for d in h.got] == [1, 2]
    for d in h.got:
        await d.ack()
    assert len(await mem.read_all(mem.names.update_log, "first", idle=0.01)) == 3


async def test_expired_message_goes_to_dead_letter_exchange(mem: MemoryTransport) -> None:
    await mem.publish(mem.names.tasks_exchange, mem.names.task_key("cpu"), b"stale", expiration=0.03)
    await mem.publish(mem.names.tasks_exchange, mem.names.task_key("cpu"), b"fresh")
    await asyncio.sleep(0.06)  # no consumer, no look: the broker expires it by itself
    dead = mem.broker.queues[mem.names.dead_queue].ready
    assert [m.body for m in dead] == [b"stale"]
    headers = dead[0].headers
    assert headers["x-first-death-reason"] == "expired"
    assert headers["x-first-death-queue"] == mem.names.task_queue("cpu")
    assert headers["x-death"][0]["original-expiration"] == "30"
    assert await bodies_in(mem, mem.names.task_queue("cpu")) == [b"fresh"]


async def test_queue_pass_keeps_order_and_gives_back_what_it_holds(mem: MemoryTransport) -> None:
    q = mem.names.dead_queue
    for body in (b"a", b"b", b"c", b"d"):
        await mem.publish("", q, body, headers={"n": body.decode()})
    async with mem.queue_pass(q) as p:
        held = [h for _ in range(4) if (h := await p.take()) is not None]
        assert [h.body for h in held] == [b"a", b"b", b"c", b"d"]
        assert await p.take() is None
        assert await p.ack(held[0]) is None  # "a" is gone
        assert await p.copy_back(held[1]) is None  # "b" is put back at the tail, as it was
        assert await p.ack(held[1]) is None
        assert await p.ack(held[1]) is not None  # no longer held
        # "c" and "d" stay held: closing the pass gives them back, at the head, in order
    async with mem.queue_pass(q) as p:
        again = [h for _ in range(3) if (h := await p.take()) is not None]
    assert [(h.body, h.redelivered, h.headers["n"]) for h in again] == [
        (b"c", True, "c"),
        (b"d", True, "d"),
        (b"b", False, "b"),
    ]
    assert (await info(mem, q)).messages == 3


async def test_queue_pass_unknown_queue(mem: MemoryTransport) -> None:
    with pytest.raises(BrokerError):
        async with mem.queue_pass("nope"):
            pass


async def test_subscribe_private_queue_is_gone_after_close( mem: MemoryTransport
) -> None:
    listener = await MemoryTransport(mem.broker, mem.names, "listener").connect()
    h = Holder()
    await listener.subscribe(mem.names.models_exchange, (mem.names.receipt_key("j1"),), h)
    private = [name for name, q in mem.broker.queues.items() if q.owner is listener]
    assert len(private) == 1
    await mem.publish(mem.names.models_exchange, mem.names.receipt_key("j1"), b"receipt")
    await mem.publish(mem.names.models_exchange, mem.names.receipt_key("j2"), b"other job", mandatory=False)
    await until(lambda: h.got, "h.got", 1.0)
    await asyncio.sleep(0.02)
    assert h.bodies == [b"receipt"]
    await listener.close(grace=0.1)
    assert private[0] not in mem.broker.queues
    with pytest.raises(BrokerError, match="unroutable"):  # only the private queue was bound to j1
        await mem.publish(mem.names.models_exchange, mem.names.receipt_key("j1"), b"nobody listens")


async def test_subscribe_durable_queue_keeps_events( mem: MemoryTransport) -> None:
    inbox = coordinator_inbox(mem.names, "j1")
    listener = await MemoryTransport(mem.broker, mem.names, "coordinator").connect()
    await listener.subscribe(mem.names.models_exchange, (mem.names.receipt_key("j1"),), Holder(), inbox)
    await listener.close(grace=0.1)
    await mem.publish(mem.names.models_exchange, mem.names.receipt_key("j1"), b"receipt")
    assert await bodies_in(mem, inbox.name) == [b"receipt"]


async def test_declare_conflicts(mem: MemoryTransport) -> None:
    await mem.declare(topology(mem.names, ("cpu",)))  # the same again: fine
    with pytest.raises(TopologyConflictError, match="x-delivery-limit"):
        await mem.declare(Topology((), (task_queue(mem.names, "cpu", Limits(task_delivery_limit=99)),), ()))
    with pytest.raises(TopologyConflictError, match="type"):
        await mem.declare(Topology((Exchange(mem.names.tasks_exchange, "fanout"),), (), ()))
    assert await mem.exchange_exists(mem.names.tasks_exchange)
    assert not await mem.exchange_exists("nope")


async def test_close_cancels_handlers_and_returns_their_deliveries( mem: MemoryTransport
) -> None:
    started = asyncio.Event()

    async def slow(d: Delivery) -> None:
        started.set()
        await asyncio.sleep(10)
        await d.ack()

    worker = await MemoryTransport(mem.broker, mem.names, "worker").connect()
    await worker.consume(mem.names.task_queue("cpu"), slow, prefetch=1)
    await mem.publish(mem.names.tasks_exchange, mem.names.task_key("cpu"), b"task")
    await started.wait()
    assert (await info(mem, mem.names.task_queue("cpu"))).messages == 0
    start = time.monotonic()
    await worker.close(grace=1.0)
    assert time.monotonic() - start < 0.9  # cancelled, not waited for
    left = await info(mem, mem.names.task_queue("cpu"))
    assert (left.messages, left.consumers) == (1, 0)
    async with mem.queue_pass(mem.names.task_queue("cpu")) as p:
        held = await p.take()
        assert held is not None and held.redelivered


async def test_consume_unknown_queue_and_purge(mem: MemoryTransport) -> None:
    with pytest.raises(BrokerError, match="does not exist"):
        await mem.consume("nope", Holder(), prefetch=1)
    for _ in range(3):
        await mem.publish("", mem.names.dead_queue, b"x")
    assert await mem.purge(mem.names.dead_queue) == 3
    assert (await info(mem, mem.names.dead_queue)).messages == 0
    assert await mem.queue_info("nope") is None


async def test_private_queue_comes_back_after_a_lost_link( mem: MemoryTransport) -> None:
    listener = await MemoryTransport(mem.broker, mem.names, "listener").connect()
    h = Holder()
    await listener.subscribe(mem.names.models_exchange, (mem.names.receipt_key("j1"),), h)
    await listener.lose_link()
    await mem.publish(mem.names.models_exchange, mem.names.receipt_key("j1"), b"after")
    await until(lambda: h.got, "h.got", 1.0)
    assert h.bodies == [b"after"]
    await listener.close(grace=0.1)


async def test_queue_with_x_expires_goes_when_unused( mem: MemoryTransport) -> None:
    idle = coordinator_inbox(mem.names.for_job("idle"), idle_expiry_ms=30)
    busy = coordinator_inbox(mem.names.for_job("busy"), 30)
    await mem.declare(Topology((), (idle, busy), ()))
    await mem.consume(busy.name, Holder(), prefetch=1)
    await asyncio.sleep(0.06)
    assert await mem.queue_info(idle.name) is None
    assert (await info(mem, busy.name)).consumers == 1
