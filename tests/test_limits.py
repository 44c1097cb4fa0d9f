"""Limits and secrets: the message size cap (codec, runtime, services, readers, publishers, the
broker's own), prefetch bounded by bytes, no password in what fedq writes, private files and temp
files opened with O_EXCL, and each role's private key in a directory of its own under ``fedq run``."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import msgpack
import pytest

from broker_config.names import REASON_HEADER, Names
from shared import codec
from shared.codec import (
    ENVELOPE_BYTES,
    MAX_MESSAGE_BYTES,
    PREFETCH_BUDGET_BYTES,
    bounded_prefetch,
    check_message_cap,
    decode,
    encode,
    open_envelope,
    task_token,
)
from shared.errors import ConfigError, TooLargeError, WireError
from shared.messages import Hello
from shared.reasons import Reason
from shared.runtime import Runtime
from shared.settings import Settings
from shared.signing import Keyring, Role, Signer
from shared.transport import Delivery, StreamEntry
from shared.transport.memory import MemoryTransport
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import Inbox, connect_like
from tests.support.messages import OWNER, make_task, make_update, trust
from tests.support.rigs import aggregator_rig, coordinator_rig, worker_rig
from tests.support.waiting import until

MiB = 1024 * 1024


def a_hello(signer: Signer, worker_id: str = "w1") -> bytes:
    return encode(Hello(worker_id, ("cpu",), signer.fingerprint, "up", 0.0), signer)


# -- the cap in the codec --------------------------------------------------------------------------


def test_the_settings_default_is_the_codecs_and_fits_what_the_defaults_send() -> None:
    s = Settings()
    assert s.max_message_bytes == MAX_MESSAGE_BYTES == 16 * MiB
    check_message_cap(s.max_message_bytes, s.inline_limit)  # the defaults are sane
    # the largest messages the defaults make: a task with an inline model of --inline-limit bytes,
    # and an update with an inline delta of that size carrying a task token; above it, claim checks
    _, raw_task = make_task(OWNER, model=b"\x01" * s.inline_limit)
    worker = Signer.generate()
    _, raw_update = make_update(
        worker, delta=b"\x02" * s.inline_limit, task=task_token(open_envelope(raw_task))
    )
    for raw in (raw_task, raw_update):
        assert s.inline_limit < len(raw) <= s.inline_limit + ENVELOPE_BYTES <= s.max_message_bytes


@pytest.mark.parametrize(
    ("cap", "inline", "problem"),
    [
        (1 * MiB, 1 * MiB, "below what fedq sends"),  # an inline model of 1 MiB plus its envelope
        (64 * 1024, 0, "below what fedq sends"),  # not even a head fits
        (513 * MiB, 1 * MiB, "the most RabbitMQ accepts"),
    ],
)
def test_a_cap_that_does_not_fit_is_a_config_error(cap: int, inline: int, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        check_message_cap(cap, inline)


def test_every_transport_made_from_settings_carries_the_cap_once_it_is_found_sane() -> None:
    from shared.transport.connect import transport_for

    assert transport_for(Settings(max_message_bytes=2 * MiB), "test").max_message_bytes == 2 * MiB
    with pytest.raises(ConfigError, match="--inline-limit"):
        transport_for(Settings(max_message_bytes=MiB), "test")  # below the default inline limit's messages
    assert (
        transport_for(Settings(max_message_bytes=MiB, inline_limit=512 * 1024), "test").max_message_bytes
        == MiB
    )


def test_a_message_above_the_cap_is_refused_before_it_is_unpacked_or_hashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signer = Signer.generate()
    ring = trust(workers={"w1": signer})
    raw = a_hello(signer)
    assert decode(raw, ring, Hello, max_bytes=len(raw))[0].worker_id == "w1"  # at the cap: fine

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpacked or hashed a message above the cap")

    monkeypatch.setattr(msgpack, "unpackb", forbidden)
    monkeypatch.setattr(hashlib, "sha256", forbidden)
    with pytest.raises(TooLargeError) as refused:
        decode(raw, ring, Hello, max_bytes=len(raw) - 1)
    assert refused.value.reason is Reason.TOO_LARGE and refused.value.raw == raw
    assert f"{len(raw)} bytes" in str(refused.value)
    with pytest.raises(TooLargeError):
        open_envelope(raw, max_bytes=len(raw) - 1)
    with pytest.raises(TooLargeError):
        open_envelope(b"\0" * (MAX_MESSAGE_BYTES + 1))  # the default cap


def test_too_large_is_a_reason_and_the_readme_lists_it() -> None:
    assert Reason("too_large") is Reason.TOO_LARGE and issubclass(TooLargeError, WireError)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "`too_large`" in readme


# -- the runtime and the services refuse it, dead-letter it, and go on ----------------------------


async def test_the_runtime_dead_letters_an_oversized_message_and_handles_the_next(
    mem: MemoryTransport, names: Names
) -> None:
    signer = Signer.generate()
    ring = trust(workers={"w1": signer})
    small, large = a_hello(signer), encode(Hello("w1", ("cpu",) * 500, signer.fingerprint, "up", 0.0), signer)
    service = await connect_like(mem, "service")
    service.max_message_bytes = len(small)  # the sender's cap is the default: the large one is sent
    seen: list[bytes] = []
    raw_seen: list[bytes] = []

    async def handle(message: Hello, envelope: codec.Envelope, delivery: Delivery) -> None:
        seen.append(delivery.body)
        await delivery.ack()

    async def raw(delivery: Delivery) -> None:
        raw_seen.append(delivery.body)
        await delivery.ack()

    runtime = Runtime(service)
    await runtime.consume_messages(names.updates_queue, Hello, ring, handle, prefetch=4)
    await runtime.consume(names.task_queue("cpu"), raw, prefetch=4)
    dead = await Inbox.on(mem, names.dead_queue)
    await mem.publish(names.results_exchange, names.results_key, large)
    await mem.publish(names.results_exchange, names.results_key, small)
    await mem.publish(names.tasks_exchange, names.task_key("cpu"), large)
    await mem.publish(names.tasks_exchange, names.task_key("cpu"), small)
    await dead.expect(large, Reason.TOO_LARGE, names.updates_queue)
    await dead.expect(large, Reason.TOO_LARGE, names.task_queue("cpu"))
    await until(lambda: seen == [small] and raw_seen == [small], "the small ones handled")
    await dead.expect_none()


async def test_the_aggregator_rejects_an_oversized_update_as_too_large(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        _, body = rig.update()
        rig.service.max_message_bytes = len(body) - 1
        await rig.send(body)
        entry = await rig.rejected(body, Reason.TOO_LARGE)  # dead-lettered, in the ledger, still up
        assert "above the cap" in entry["detail"]
        rig.service.max_message_bytes = MAX_MESSAGE_BYTES
        task_id, body = rig.update()
        await rig.send(body)
        await rig.ledger_entry(task_id, "applied")


async def test_the_worker_dead_letters_an_oversized_task_and_trains_the_next(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with worker_rig(mem, tmp_path, start=True) as rig:
        _, large = rig.task()
        rig.transport.max_message_bytes = len(large) - 1
        await rig.send(large)
        await rig.dead.expect(large, Reason.TOO_LARGE, rig.task_queue)
        rig.transport.max_message_bytes = MAX_MESSAGE_BYTES
        task = await rig.send_task()
        update, _ = await rig.next_update()
        assert update.task_id == task.task_id
        rig.check_alive()


async def test_the_coordinator_dead_letters_an_oversized_hello_and_goes_on(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with coordinator_rig(mem, tmp_path) as r:
        dead = await Inbox.on(r.client, r.names.dead_queue)
        key = Signer.generate()
        r.trust.add(key.public, Role.WORKER, worker_id="big")
        large = encode(Hello("big", ("cpu",) * 500, key.fingerprint, "up", time.time()), key)
        r.coordinator.transport.max_message_bytes = len(large) - 1
        await r.client.publish(r.names.workers_exchange, r.names.hello_key, large)
        refused = await dead.next()  # from the coordinator's own hello queue
        assert (refused.body, refused.headers[REASON_HEADER]) == (large, Reason.TOO_LARGE)
        await r.hello("w1")
        await until(lambda: r.tasks, "a task for the worker that fits")
        r.check_alive()


def test_the_log_readers_skip_an_oversized_entry_without_unpacking_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedq.replay import decode_entries

    worker = Signer.generate()
    _, small = make_update(worker, job_id="j")
    _, large = make_update(worker, job_id="j", delta=b"\0" * 4096, quant="none")
    entries = [StreamEntry(0, None, large), StreamEntry(1, None, small)]
    unpacked: list[int] = []
    real = msgpack.unpackb

    def counted(data: bytes, **kw: object) -> object:
        unpacked.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(msgpack, "unpackb", counted)
    got = decode_entries(entries, "j", None, max_bytes=len(small))
    assert [u.entry.offset for u in got] == [1]
    assert len(large) not in unpacked


# -- publishers refuse it ----------------------------------------------------------------------------


async def test_a_publish_above_the_cap_is_refused_before_it_is_sent(
    mem: MemoryTransport, names: Names
) -> None:
    inbox = await Inbox.on(mem, names.updates_queue)
    mem.max_message_bytes = 1000
    with pytest.raises(TooLargeError, match=r"refusing to publish 1001 bytes .* above the cap of 1000"):
        await mem.publish(names.results_exchange, names.results_key, b"x" * 1001)
    await mem.publish(names.results_exchange, names.results_key, b"x" * 1000)
    assert len((await inbox.next()).body) == 1000
    await inbox.expect_none()
    assert mem.bytes_published == 1000


async def test_a_dead_letter_keeps_the_whole_oversized_body(mem: MemoryTransport, names: Names) -> None:
    """What the broker took once is dead-lettered whole, with its reason: nothing is lost."""
    dead = await Inbox.on(mem, names.dead_queue)
    await mem.publish(names.results_exchange, names.results_key, b"y" * 5000)
    service = await connect_like(mem, "service")
    service.max_message_bytes = 1000
    got: list[Delivery] = []

    async def take(delivery: Delivery) -> None:
        got.append(delivery)

    await service.consume(names.updates_queue, take, prefetch=1)
    await until(lambda: got, "the delivery")
    await got[0].dead_letter(Reason.TOO_LARGE, "above the cap")
    d = await dead.next()
    assert d.body == b"y" * 5000 and d.headers[REASON_HEADER] == Reason.TOO_LARGE


# -- prefetch bounded by bytes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "cap", "need", "expected"),
    [
        (1, 16 * MiB, 1, 1),  # the worker: one task at a time
        (64, 16 * MiB, 1, PREFETCH_BUDGET_BYTES // (16 * MiB)),  # 64 x 16 MiB would be 1 GiB
        (64, 2 * MiB, 1, 64),  # a smaller cap leaves room for what was asked
        (0, 16 * MiB, 1, 16),  # "no limit" is bounded too
        (120, 16 * MiB, 31, 31),  # never below what the consumer holds to make progress
        (500, 600 * MiB, 1, 1),  # at least one
    ],
)
def test_prefetch_is_bounded_so_that_prefetch_times_the_cap_stays_in_the_budget(
    wanted: int, cap: int, need: int, expected: int
) -> None:
    got = bounded_prefetch(wanted, cap, need=need)
    assert got == expected
    assert got == need or got == 1 or got * cap <= PREFETCH_BUDGET_BYTES


async def test_consumers_ask_the_broker_for_the_bounded_prefetch(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    runtime = Runtime(mem)

    async def nothing(message: Hello, envelope: codec.Envelope, delivery: Delivery) -> None:
        pass

    await runtime.consume_messages(names.updates_queue, Hello, Keyring(), nothing, prefetch=1000)
    consumers = mem.broker.queues[names.updates_queue].consumers
    assert [c.prefetch for c in consumers] == [PREFETCH_BUDGET_BYTES // MAX_MESSAGE_BYTES]


@pytest.mark.parametrize(("k", "need"), [(2, 6), (40, 41)])  # the clip's warm-up holds 5; a buffer K
async def test_the_aggregator_prefetches_at_least_what_it_holds_for_a_version(
    mem: MemoryTransport, names: Names, tmp_path: Path, k: int, need: int
) -> None:
    from aggregator.config import AggregatorConfig
    from aggregator.service import Aggregator
    from shared.aggregation import Policy
    from shared.ledger import JsonLines
    from shared.store import LocalStore, ModelStore
    from tests.support.messages import MAKER, save_v0, tiny_model

    store = ModelStore(LocalStore(tmp_path / "store"), names.job, trust())
    await save_v0(store, tiny_model())
    service = await connect_like(mem, "aggregator")
    aggregator = Aggregator(
        AggregatorConfig(Policy(k=k)),
        transport=service,
        store=store,
        signer=MAKER,
        keyring=trust(),
        ledger=JsonLines(tmp_path / "ledger.jsonl"),
    )
    import asyncio

    running = asyncio.create_task(aggregator.run())
    try:
        await until(lambda: mem.broker.queues[names.updates_queue].consumers, "the aggregator to consume")
        [consumer] = mem.broker.queues[names.updates_queue].consumers
        assert consumer.prefetch == max(need, PREFETCH_BUDGET_BYTES // MAX_MESSAGE_BYTES)
        assert consumer.prefetch * MAX_MESSAGE_BYTES <= max(PREFETCH_BUDGET_BYTES, need * MAX_MESSAGE_BYTES)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


# -- on the real broker ------------------------------------------------------------------------------

broker_node = pytest.mark.broker  # tests on a private node (conftest marks by fixture name only)
BROKER_CAP = 200_000


def test_the_compose_brokers_cap_matches_the_default() -> None:
    conf = (Path(__file__).parents[1] / "broker_config" / "rabbitmq.conf").read_text()
    values = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in conf.splitlines())
        if value and not key.lstrip().startswith("#")
    )
    assert int(values["max_message_size"]) == MAX_MESSAGE_BYTES


async def test_rabbitmq_does_not_implement_prefetch_size(amqp_url: str) -> None:
    """Why prefetch is bounded by count (``shared.codec.bounded_prefetch``): the broker refuses a
    byte window, and closes the whole connection for asking."""
    import aio_pika
    import aiormq.exceptions

    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": "test-prefetch-size"})
    try:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ConnectionNotImplemented, match="prefetch_size"):
            await channel.set_qos(prefetch_count=4, prefetch_size=MiB)
    finally:
        await connection.close()


async def test_an_oversized_message_through_rabbitmq_is_dead_lettered_too_large(broker: RabbitMQ) -> None:
    names = broker.names
    signer = Signer.generate()
    ring = trust(workers={"w1": signer})
    small, large = a_hello(signer), encode(Hello("w1", ("cpu",) * 500, signer.fingerprint, "up", 0.0), signer)
    service = await connect_like(broker, "test-limits-service")
    service.max_message_bytes = len(small)
    seen: list[bytes] = []

    async def handle(message: Hello, envelope: codec.Envelope, delivery: Delivery) -> None:
        seen.append(delivery.body)
        await delivery.ack()

    try:
        await Runtime(service).consume_messages(names.updates_queue, Hello, ring, handle, prefetch=4)
        dead = await Inbox.on(broker, names.dead_queue)
        await broker.publish(names.results_exchange, names.results_key, large)
        await broker.publish(names.results_exchange, names.results_key, small)
        await dead.expect(large, Reason.TOO_LARGE, names.updates_queue)
        await until(lambda: seen == [small], "the small one handled")
    finally:
        await service.close()


@broker_node
def test_the_broker_refuses_a_message_above_its_max_message_size_and_fedq_says_so(tmp_path: Path) -> None:
    import asyncio

    from broker_config.topology import topology
    from shared.errors import BrokerError
    from tests.support.private_broker import PrivateBrokerError, private_rabbit_node

    async def attempt(url: str) -> None:
        names = Names(f"t-{uuid.uuid4().hex[:10]}")
        transport = await RabbitMQ(url, names, "test-broker-cap", publish_retry_seconds=60).connect()
        try:
            await transport.declare(topology(names, ("cpu",)))
            inbox = await Inbox.on(transport, names.task_queue("cpu"))
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"refused a 200001-byte message .*max_message_size"):
                await transport.publish(names.tasks_exchange, names.task_key("cpu"), b"x" * (BROKER_CAP + 1))
            assert time.monotonic() - started < 10  # refused at once, not retried as a lost link
            await transport.publish(names.tasks_exchange, names.task_key("cpu"), b"x" * BROKER_CAP)
            assert len((await inbox.next()).body) == BROKER_CAP  # the channel came back: at the cap it goes
        finally:
            await transport.close()

    try:
        with private_rabbit_node(tmp_path / "rabbit", conf=(f"max_message_size = {BROKER_CAP}",)) as node:
            asyncio.run(attempt(node.amqp_url))
    except PrivateBrokerError as exc:
        pytest.fail(f"cannot start a private RabbitMQ node: {exc}", pytrace=False)


# -- no password in what fedq writes or logs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted", "written"),
    [
        ("amqp://u:s3cret@h:5672/v?heartbeat=5", "amqp://u:***@h:5672/v", "amqp://u@h:5672/v?heartbeat=5"),
        ("amqp://u:p%40ss%3A@h/", "amqp://u:***@h/", "amqp://u@h/"),  # an escaped password too
        ("amqps://u@h:5671/", "amqps://u@h:5671/", "amqps://u@h:5671/"),  # nothing to hide
        (
            "http://admin:pw@127.0.0.1:15672/",
            "http://admin:***@127.0.0.1:15672/",
            "http://admin@127.0.0.1:15672/",
        ),
    ],
)
def test_urls_lose_their_password(url: str, redacted: str, written: str) -> None:
    from shared.redact import redact, redact_text, without_password
    from shared.transport.rabbitmq import redact as transport_redact

    assert redact(url) == transport_redact(url) == redacted
    assert without_password(url) == written
    text = redact_text(f"error: cannot reach {url} (refused)")
    assert "s3cret" not in text and "p%40ss" not in text and ":pw@" not in text


def test_no_log_line_holds_a_password(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from shared.logs import configure_logging, get_logger

    kept = structlog.get_config()
    try:
        configure_logging("info", json=True)
        log = get_logger(amqp_url="amqp://fedq:hunter2@broker:5672/")
        try:
            raise ConnectionError("cannot reach amqps://fedq:hunter2@broker:5671/")
        except ConnectionError as exc:
            log.exception("connect_failed", error=repr(exc), management="http://admin:hunter2@broker:15672/")
    finally:
        structlog.configure(**kept)
    err = capsys.readouterr().err
    assert "connect_failed" in err and "fedq:***@broker" in err and "admin:***@broker" in err
    assert "hunter2" not in err


def test_config_json_holds_no_password_and_the_tools_take_the_callers(tmp_path: Path) -> None:
    import json

    from fedq.audit import settings_for
    from fedq.run import _public

    settings = Settings(
        amqp_url="amqp://fedq:hunter2@127.0.0.1:5672/",
        management_url="http://fedq:hunter2@127.0.0.1:15672/",
        amqp_password="hunter3",
    )
    written = json.dumps({"settings": _public(settings)}, default=str)
    assert "hunter" not in written
    (tmp_path / "config.json").write_text(written)
    assert json.loads(written)["settings"]["amqp_url"] == "amqp://fedq@127.0.0.1:5672/"
    mine = Settings(amqp_url="amqp://fedq:hunter2@127.0.0.1:5672/")
    assert settings_for(str(tmp_path), mine).amqp_url == mine.amqp_url  # same user and broker: its password
    other = Settings(amqp_url="amqp://guest:guest@elsewhere:5672/")
    assert settings_for(str(tmp_path), other).amqp_url == "amqp://fedq@127.0.0.1:5672/"  # give its password


@broker_node
@pytest.mark.slow
@pytest.mark.timeout(300)
# -- private files, and temp files opened with O_EXCL ------------------------------------------------


def _write_private_key(folder: Path) -> Path:
    from shared.keys import write_private_key

    write_private_key(Signer.generate(), folder / "coordinator.key")
    return folder / "coordinator.key"


def _write_public_key(folder: Path) -> Path:
    from shared.keys import write_public_key

    write_public_key(Signer.generate().public, folder / "coordinator.pub")
    return folder / "coordinator.pub"


def _revoke(folder: Path) -> Path:
    from fedq.keys import revoke

    revoke(folder, "0123456789abcdef")
    return folder / "revoked"


def _coordinator_state(folder: Path) -> Path:
    from coordinator.state import FILE_NAME, CoordinatorState

    CoordinatorState("j").write(folder)
    return folder / FILE_NAME


def _processes_json(folder: Path) -> Path:
    from fedq.run import Launcher

    Launcher(Settings(), folder, folder / "keys").write_pids()
    return folder / "processes.json"


def _store_put(folder: Path) -> Path:
    import asyncio

    from shared.store import LocalStore

    asyncio.run(LocalStore(folder).put("m.bin", b"model"))
    return folder / "m.bin"


def _outbox_put(folder: Path) -> Path:
    from worker.outbox import Outbox

    return Outbox(folder).put("t1", b"update").path


def _definitions_file(folder: Path) -> Path:
    from fedq.broker import Request, apply

    (folder / "trusted" / "workers").mkdir(parents=True)
    settings = Settings(keys_dir=str(folder), namespace="t", job="j")
    apply(settings, Request(workers="w1", definitions_file=str(folder / "definitions.json")))
    return folder / "definitions.json"


# each writer, the file it writes, the fixed temp name it used to write through, and the file's mode
WRITERS = {
    "private key": (_write_private_key, "coordinator.key.tmp", 0o600),
    "public key": (_write_public_key, "coordinator.pub.tmp", 0o644),
    "revocation list": (_revoke, "revoked.tmp", 0o644),
    "coordinator state": (_coordinator_state, "coordinator.tmp", 0o644),
    "processes.json": (_processes_json, "processes.json.tmp", 0o644),
    "store object": (_store_put, "", 0o600),
    "outbox entry": (_outbox_put, "", 0o600),
    "broker definitions (password hashes)": (_definitions_file, "definitions.json", 0o600),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_file_is_written_through_a_temp_file_opened_with_o_excl(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    write, _, mode = WRITERS[writer]
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: str | bytes | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        opened.append((os.fsdecode(path), flags))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)  # no help from the umask: the mode is fedq's own
    try:
        written = write(tmp_path)
    finally:
        os.umask(old)
    created = [(p, f) for p, f in opened if f & os.O_CREAT]
    assert created, "no file was created with os.open (a plain open() follows a planted symlink)"
    assert all(f & os.O_EXCL for _, f in created), created
    assert str(written) not in {p for p, _ in created}  # it arrives whole, by a rename of the temp file
    assert written.stat().st_mode & 0o777 == mode
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("writer", [w for w, (_, planted, _) in WRITERS.items() if planted])
def test_a_planted_temp_file_or_symlink_is_never_written_through(writer: str, tmp_path: Path) -> None:
    """Whoever can write the folder plants the temp name fedq used (or the target) as a symlink to a
    file of theirs: fedq must not write a key, a state or password hashes into it."""
    write, planted, _ = WRITERS[writer]
    victim = tmp_path / "attacker" / "loot"
    victim.parent.mkdir()
    victim.write_bytes(b"untouched")
    folder = tmp_path / "folder"
    folder.mkdir()
    if writer == "revocation list":
        folder = folder / "trusted"
        folder.mkdir()
    (folder / planted).symlink_to(victim)
    written = write(folder)
    assert victim.read_bytes() == b"untouched"
    assert not written.is_symlink() and written.stat().st_size > 0


def test_an_existing_private_key_folder_keeps_its_mode_and_a_new_one_is_0700(tmp_path: Path) -> None:
    import os

    from shared.keys import write_private_key

    old = os.umask(0o022)
    try:
        write_private_key(Signer.generate(), tmp_path / "new" / "nested" / "a.key")
        mine = tmp_path / "mine"
        mine.mkdir(mode=0o755)
        write_private_key(Signer.generate(), mine / "b.key")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "nested").stat().st_mode & 0o777 == 0o700
    assert mine.stat().st_mode & 0o777 == 0o755  # the user's own folder is left as it is
    assert (mine / "b.key").stat().st_mode & 0o777 == 0o600


# -- under fedq run, each role's private key in a folder of its own ----------------------------------


def test_fedq_run_keeps_each_private_key_in_a_folder_of_its_own(tmp_path: Path) -> None:
    import os

    from fedq.run import Launcher, prepare_keys
    from shared.keys import DirectoryTrust, load_or_create_signer

    old = os.umask(0o022)
    try:
        keys = prepare_keys(tmp_path / "run", ["w00", "w01"])
    finally:
        os.umask(old)
    own = {
        "coordinator": keys / "coordinator" / "coordinator.key",
        "aggregator": keys / "aggregator" / "aggregator.key",
        "operator": keys / "operator" / "operator.key",
        "w00": keys / "workers" / "w00" / "worker-w00.key",
        "w01": keys / "workers" / "w01" / "worker-w01.key",
    }
    assert sorted(keys.rglob("*.key")) == sorted(own.values())  # no private key anywhere else
    for path in own.values():
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert [p.name for p in path.parent.iterdir() if p.suffix == ".key"] == [path.name]
    assert (keys / "workers").stat().st_mode & 0o777 == 0o700 and keys.stat().st_mode & 0o777 == 0o700
    peers = {p.fingerprint: p for p in DirectoryTrust(keys / "trusted").peers()}
    for name, path in own.items():
        peer = peers[load_or_create_signer(path).fingerprint]
        assert (str(next(iter(peer.roles))), peer.worker_id) == (
            ("worker", name) if name.startswith("w") else (name, "")
        )
    launcher = Launcher(Settings(), tmp_path / "run", keys)
    for name in ("coordinator", "aggregator", "w00"):
        assert launcher.key_flags(name) == ["--key-file", str(own[name])]


def test_the_processes_of_a_run_sign_with_the_keys_in_their_own_folders(run: tuple[Path, Names]) -> None:
    import json

    from shared.keys import load_or_create_signer

    out, _ = run
    keys = out / "keys"
    job = json.loads((out / "config.json").read_text())["settings"]["job"]
    signers = {
        json.loads(p.read_text())["signer"] for p in (out / "store" / "jobs" / job / "models").glob("v*.json")
    }
    coordinator = load_or_create_signer(keys / "coordinator" / "coordinator.key").fingerprint
    aggregator = load_or_create_signer(keys / "aggregator" / "aggregator.key").fingerprint
    assert {coordinator, aggregator} <= signers  # version 0, and the versions the aggregator made
    assert not list(keys.glob("*.key"))  # nothing in the shared folder
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    workers = {r["worker_id"] for r in ledger if r.get("fate") == "applied"}
    assert workers == {"w00", "w01"}  # each signed with its key in keys/workers/<id>/, enrolled under its id


def test_fedq_run_refuses_a_cap_below_what_it_sends_before_making_its_folder(tmp_path: Path) -> None:
    from fedq.run import run_job

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="--max-message-bytes 1000 is below what fedq sends"):
        run_job(Settings(out=str(out), max_message_bytes=1000), workers=1, progress=False)
    assert not out.exists()
