"""``fedq dlq``: list and show leave the dead-letter queue as it was, requeue puts exactly the
chosen messages back on their source queue, clean of dead-letter headers.

Each test builds the same dead queue in its own namespace:

    #1 expired         a task the broker expired on the task queue (per-message TTL)
    #2 stale           an update dead-lettered by a consumer of the updates queue
    #3 undecodable     garbage, from the updates queue
    #4 stale           another update
    #5 unknown_signer  a task dead-lettered by a consumer of the task queue
    #6 unknown         bytes published straight to the dead-letter exchange: no reason, no source

What ``fedq dlq`` makes of the queue runs on the in-memory broker; the real RabbitMQ keeps the
ordered pass over a quorum queue (which it reorders, measured on 3.10) and the command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import dataclass

import pytest

from broker_config.names import DETAIL_HEADER, REASON_HEADER, SOURCE_HEADER, Names
from fedq import dlq
from fedq.dlq import Choice
from shared.errors import ConfigError
from shared.messages import TrainConfig
from shared.signing import Signer
from shared.transport import Delivery, Transport
from shared.transport.memory import MemoryTransport
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import connect_like, drain
from tests.support.jobs import ROOT, fedq
from tests.support.messages import make_task, make_update
from tests.support.waiting import WAIT, until

pytestmark = pytest.mark.timeout(30)

DEATH_HEADERS = {REASON_HEADER, DETAIL_HEADER, SOURCE_HEADER, "x-death"}


def dead_task(signer: Signer) -> tuple[str, bytes]:
    """A task as the dead queue will hold it: its id and bytes (300 bytes of model)."""
    task, body = make_task(signer, model=b"\x07" * 300, train=TrainConfig(epochs=1))
    return task.task_id, body


def dead_update(signer: Signer) -> tuple[str, bytes]:
    """An update (200 bytes of payload) and its task id."""
    return make_update(signer, delta=b"\x01" * 200)


@dataclass
class Scene:
    names: Names
    coordinator: Signer
    worker: Signer
    expired: tuple[str, bytes]
    stale_a: tuple[str, bytes]
    garbage: bytes
    stale_b: tuple[str, bytes]
    impostor_task: tuple[str, bytes]
    orphan: bytes


async def dead_letter_through_consumer(
    broker: Transport, queue: str, verdicts: dict[bytes, tuple[str, str]]
) -> None:
    """Play a service: consume ``queue`` on a connection of its own and dead-letter every message
    with the reason given for its body (one at a time, so their order is kept), then go away."""
    service = await connect_like(broker, "test-dlq-service")
    left = dict(verdicts)
    done = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        reason, detail = left.pop(delivery.body)
        await delivery.dead_letter(reason, detail)
        if not left:
            done.set()

    try:
        await service.consume(queue, handle, prefetch=1)
        await asyncio.wait_for(done.wait(), WAIT)
    finally:
        await service.close()


async def until_dead(broker: Transport, count: int) -> list[dlq.DeadLetter]:
    async def enough() -> list[dlq.DeadLetter]:
        letters = await dlq.read(broker)
        return letters if len(letters) >= count else []

    letters: list[dlq.DeadLetter] = await until(enough, f"{count} messages in the dead queue")
    return letters


async def build_scene(broker: Transport) -> Scene:
    names = broker.names
    coordinator, worker, impostor = Signer.generate(), Signer.generate(), Signer.generate()
    expired = dead_task(coordinator)
    await broker.publish(names.tasks_exchange, names.task_key("cpu"), expired[1], expiration=0.05)
    await until_dead(broker, 1)  # the broker dead-letters it (nobody consumes the task queue yet)

    stale_a, stale_b = dead_update(worker), dead_update(worker)
    garbage = b"garbage \xff not msgpack"
    for body in (stale_a[1], garbage, stale_b[1]):
        await broker.publish(names.results_exchange, names.results_key, body)
    await dead_letter_through_consumer(
        broker,
        names.updates_queue,
        {
            stale_a[1]: ("stale", "staleness 3 > 2"),
            garbage: ("undecodable", "not msgpack"),
            stale_b[1]: ("stale", "staleness 5 > 2"),
        },
    )

    impostor_task = dead_task(impostor)
    await broker.publish(names.tasks_exchange, names.task_key("cpu"), impostor_task[1])
    await dead_letter_through_consumer(
        broker,
        names.task_queue("cpu"),
        {impostor_task[1]: ("unknown_signer", "task signed by an unpinned key")},
    )

    orphan = b"published straight to the dead-letter exchange"
    await broker.publish(names.dead_exchange, "", orphan)
    await until_dead(broker, 6)
    return Scene(names, coordinator, worker, expired, stale_a, garbage, stale_b, impostor_task, orphan)


def shape(letters: list[dlq.DeadLetter]) -> list[tuple[int, str, str, str, str]]:
    return [(d.position, d.reason, d.source, d.peek.kind, d.peek.task_id) for d in letters]


# -- list and show ------------------------------------------------------------------------------


async def test_list_gives_reasons_and_sources_and_leaves_the_queue_intact(mem: MemoryTransport, names: Names) -> None:
    s = await build_scene(mem)
    tasks, updates = names.task_queue("cpu"), names.updates_queue
    letters = await dlq.read(mem)
    assert shape(letters) == [
        (1, "expired", tasks, "task", s.expired[0]),
        (2, "stale", updates, "update", s.stale_a[0]),
        (3, "undecodable", updates, "", ""),
        (4, "stale", updates, "update", s.stale_b[0]),
        (5, "unknown_signer", tasks, "task", s.impostor_task[0]),
        (6, "unknown", "", "", ""),
    ]
    assert [d.reason_from for d in letters] == ["broker", "fedq", "fedq", "fedq", "fedq", ""]
    assert letters[0].time_of == "died" and all(d.time is not None for d in letters if d.peek.kind)
    assert letters[2].size == len(s.garbage)

    # nothing was taken away, reordered or changed: a second reading sees the same messages
    again = await dlq.read(mem)
    assert [(d.sha256, d.headers, d.time) for d in again] == [(d.sha256, d.headers, d.time) for d in letters]

    assert shape(await dlq.read(mem, reason="stale")) == [shape(letters)[1], shape(letters)[3]]
    text = dlq.render_list(names.dead_queue, letters)
    assert text.splitlines()[-1] == (
        f"6 dead letters in {names.dead_queue}: expired 1, stale 2, undecodable 1, unknown 1, unknown_signer 1"
    )
    assert s.stale_a[0] in text and "died 20" in text
    assert len(await dlq.read(mem)) == 6


async def test_show_decodes_the_envelope_without_trusting_it(mem: MemoryTransport, names: Names) -> None:
    s = await build_scene(mem)
    d = await dlq.show(mem, 2)
    assert (d.reason, d.detail, d.source) == ("stale", "staleness 3 > 2", names.updates_queue)
    assert d.peek.kind == "update" and d.peek.signer == s.worker.fingerprint
    assert d.peek.fields["task_id"] == s.stale_a[0] and d.peek.fields["num_samples"] == 10
    assert "delta" not in d.peek.fields and d.peek.payload_bytes == 200
    text = dlq.render_show(names.dead_queue, names, d)
    assert "signature not verified" in text and "<200 bytes of payload>" in text
    assert f'{REASON_HEADER}: "stale"' in text

    expired = await dlq.show(mem, 1)
    assert expired.headers["x-first-death-reason"] == "expired"
    doc = json.loads(json.dumps(expired.to_dict(names, full=True)))  # x-death times become text
    assert doc["headers"]["x-death"][0]["reason"] == "expired"
    assert doc["fields"]["train"]["epochs"] == 1 and doc["payload_bytes"] == 300
    assert doc["requeue_to"] == names.task_queue("cpu")

    garbage = await dlq.show(mem, 3)
    assert garbage.peek.kind == "" and "not msgpack" in garbage.peek.error
    assert "body starts b'garbage" in dlq.render_show(names.dead_queue, names, garbage)

    with pytest.raises(ConfigError, match=r"no message #7: .* holds 6 \(#1 to #6\)"):
        await dlq.show(mem, 7)
    with pytest.raises(ConfigError, match="positions start at 1"):
        await dlq.show(mem, 0)
    assert len(await dlq.read(mem)) == 6


async def test_many_dead_letters_keep_their_order(broker: RabbitMQ, names: Names) -> None:
    """Well over 32. Measured on 3.10, a quorum queue shuffles that many messages when it takes
    them back unacked, and closing a channel right after that many acks loses some of them:
    a pass must neither reorder nor duplicate."""
    n = 100
    for i in range(n):
        reason = "stale" if i % 3 == 0 else "undecodable"
        headers = {REASON_HEADER: reason, SOURCE_HEADER: names.updates_queue, DETAIL_HEADER: f"m{i}"}
        await broker.publish(names.dead_exchange, "", f"m{i}".encode(), headers=headers)
    first = await until_dead(broker, n)
    assert [d.detail for d in first] == [f"m{i}" for i in range(n)]
    assert [d.detail for d in await dlq.read(broker)] == [f"m{i}" for i in range(n)]
    assert (await dlq.show(broker, 98)).detail == "m97"

    outcomes = await dlq.requeue(broker, Choice(reason="stale"))
    assert [o.letter.detail for o in outcomes] == [f"m{i}" for i in range(0, n, 3)]
    assert [d.body for d in await drain(broker, names.updates_queue, expect=len(outcomes))] == [
        f"m{i}".encode() for i in range(0, n, 3)
    ]
    assert [d.detail for d in await dlq.read(broker)] == [f"m{i}" for i in range(n) if i % 3]


# -- requeue ------------------------------------------------------------------------------------


async def test_requeue_by_reason_puts_exactly_those_back(mem: MemoryTransport, names: Names) -> None:
    s = await build_scene(mem)
    before = await dlq.read(mem)

    dry = await dlq.requeue(mem, Choice(reason="stale"), dry_run=True)
    assert [(o.action, o.letter.position, o.target) for o in dry] == [
        ("would requeue", 2, names.updates_queue),
        ("would requeue", 4, names.updates_queue),
    ]
    assert [d.sha256 for d in await dlq.read(mem)] == [d.sha256 for d in before]

    outcomes = await dlq.requeue(mem, Choice(reason="stale"))
    assert [(o.action, o.letter.position, o.target) for o in outcomes] == [
        ("requeued", 2, names.updates_queue),
        ("requeued", 4, names.updates_queue),
    ]
    back = await drain(mem, names.updates_queue, expect=2)
    assert [d.body for d in back] == [s.stale_a[1], s.stale_b[1]]
    for d in back:
        assert not DEATH_HEADERS & set(d.headers), dict(d.headers)
        assert not any(k.startswith("x-first-death-") for k in d.headers)
        assert not d.redelivered and d.headers.get("x-delivery-count", 0) == 0

    left = await dlq.read(mem)
    assert [(d.position, d.reason) for d in left] == [
        (1, "expired"),
        (2, "undecodable"),
        (3, "unknown_signer"),
        (4, "unknown"),
    ]
    assert "requeued 2" in dlq.render_requeue(names.dead_queue, outcomes, dry_run=False)


async def test_requeue_positions_skips_unknown_sources_and_rejects_bad_ones(mem: MemoryTransport, names: Names) -> None:
    s = await build_scene(mem)

    with pytest.raises(ConfigError, match=r"no message #9, #12: .* holds 6.*nothing was requeued"):
        await dlq.requeue(mem, Choice(positions=(1, 9, 12)))
    assert len(await dlq.read(mem)) == 6
    with pytest.raises(ConfigError, match="say which messages"):
        Choice()

    outcomes = await dlq.requeue(mem, Choice(positions=(6, 1)))
    assert [(o.action, o.letter.position, o.target) for o in outcomes] == [
        ("requeued", 1, names.task_queue("cpu")),
        ("skipped", 6, None),
    ]
    assert "source queue is unknown" in outcomes[1].note
    text = dlq.render_requeue(names.dead_queue, outcomes, dry_run=False)
    assert f"requeued #1 (expired task {s.expired[0]}) -> {names.task_queue('cpu')}" in text

    # the expired task is back on its task queue, as it was sent, with no record of its death
    async with mem.queue_pass(names.task_queue("cpu")) as task_queue:
        message = await task_queue.take()
        assert message is not None and message.body == s.expired[1]
        headers = set(message.headers)
        assert not DEATH_HEADERS & headers and not any(h.startswith("x-first-death-") for h in headers)
        assert not message.redelivered and message.headers.get("x-delivery-count", 0) == 0
        assert await task_queue.ack(message) is None
        assert await task_queue.take() is None

    assert [(d.reason, d.source) for d in await dlq.read(mem)] == [
        ("stale", names.updates_queue),
        ("undecodable", names.updates_queue),
        ("stale", names.updates_queue),
        ("unknown_signer", names.task_queue("cpu")),
        ("unknown", ""),
    ]


# -- the command line ---------------------------------------------------------------------------


def dlq_command(amqp_url: str, names: Names, *args: str) -> subprocess.CompletedProcess[str]:
    """``fedq dlq ARGS`` as its own process, with no FEDQ_* setting but the namespace and URL given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDQ_")}
    argv = fedq("dlq", *args, "--namespace", names.namespace, "--amqp-url", amqp_url)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=20, check=False)


async def test_cli(broker: RabbitMQ, names: Names, amqp_url: str) -> None:
    s = await build_scene(broker)

    listed = await asyncio.to_thread(dlq_command, amqp_url, names, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert doc["total"] == 6
    assert doc["by_reason"] == {"expired": 1, "stale": 2, "undecodable": 1, "unknown": 1, "unknown_signer": 1}
    assert [m["reason"] for m in doc["messages"]] == [
        "expired",
        "stale",
        "undecodable",
        "stale",
        "unknown_signer",
        "unknown",
    ]
    assert doc["messages"][1]["task_id"] == s.stale_a[0]
    assert doc["messages"][1]["requeue_to"] == names.updates_queue

    plain = await asyncio.to_thread(dlq_command, amqp_url, names, "list", "--reason", "stale")
    assert plain.returncode == 0 and "(showing the 2 with reason 'stale')" in plain.stdout

    shown = await asyncio.to_thread(dlq_command, amqp_url, names, "show", "5", "--json")
    assert shown.returncode == 0, shown.stderr
    one = json.loads(shown.stdout)
    assert (one["kind"], one["task_id"], one["position"]) == ("task", s.impostor_task[0], 5)
    assert one["detail"] == "task signed by an unpinned key"
    assert one["headers"][SOURCE_HEADER] == names.task_queue("cpu")

    bad = await asyncio.to_thread(dlq_command, amqp_url, names, "show", "99")
    assert bad.returncode == 2 and "no message #99" in bad.stderr

    dry = await asyncio.to_thread(dlq_command, amqp_url, names, "requeue", "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would requeue 5, skipped 1 (dry run)" in dry.stdout
    assert len(await dlq.read(broker)) == 6

    done = await asyncio.to_thread(dlq_command, amqp_url, names, "requeue", "3")
    assert done.returncode == 0, done.stderr
    assert f"requeued #3 (undecodable) -> {names.updates_queue}" in done.stdout
    assert [d.body for d in await drain(broker, names.updates_queue, expect=1)] == [s.garbage]
    assert len(await dlq.read(broker)) == 5
