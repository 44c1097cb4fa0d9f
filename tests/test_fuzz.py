"""The fuzz test: each service's handler gets 10,000 messages mutated from real signed ones (see
``tests.support.fuzz.Mutator``: bit flips, truncations, envelope fields changed, head fields of
the wrong type or out of range, fields and kinds swapped between messages, payloads changed,
tokens of other tasks...), most of the field mutations re-signed with a key the service trusts so
that they reach its logic. Throughout, the service stays up; at the end every message is
accounted for exactly (``sent == acked + dead-lettered``, message by message, by digest; the
aggregator's acks are its ledger's applied updates) and nothing is left unsettled in its queue;
and the model changed only through what was applied (the aggregator's versions are re-derived
from the updates their manifests list, every one of which the test saw applied).

The aggregator's 10,000 go through the real RabbitMQ (about 16 s here). The coordinator's and the
worker's 10,000 run on the in-memory transport (the same runtime and service code), and a further
1,000 each on the real RabbitMQ: 10,000 through the real broker took 13 s for the coordinator and
19 s for the worker (it takes one task at a time, and each dead letter waits for its publish
confirm), which with the aggregator's would leave no margin in the file's 60-second budget on a
2-core machine.

Seeded (``FEDQ_FUZZ_SEED`` overrides the default; the seed is printed)."""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from structlog.testing import capture_logs

from aggregator.binding import bind
from aggregator.core import Accepted, AggregatorCore
from broker_config.names import Names
from shared.codec import decode, encode, task_token
from shared.errors import WireError
from shared.messages import Hello, ModelAnnouncement, Receipt, Receipts, Round, Task, Update
from shared.signing import Role, Signer
from shared.transport.memory import MemoryTransport
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import AnyTransport, assert_settled
from tests.support.fuzz import (
    HUGE_INT,
    DeadLetters,
    Mutator,
    Tally,
    check_reasons,
    digest,
    elapsed,
    fuzz_seed,
    key,
    publish_all,
)
from tests.support.messages import MAKER, OWNER, make_task, make_update, save_version, token_of, trust
from tests.support.rigs import AggregatorRig, aggregator_rig, coordinator_rig, worker_rig
from tests.support.waiting import until

JOB = "job1"
N = 10_000
SETTLE = 60.0  # seconds the services may take to settle what they were sent


async def settled(
    what: str, done: Callable[[], bool], alive: Callable[[], None], wait: float = SETTLE
) -> None:
    def check() -> bool:
        alive()
        return done()

    await until(check, what, wait=wait, poll=0.05)


# -- the aggregator -----------------------------------------------------------------------------


K = 64  # few versions: each is a store write


def aggregator_mutator(
    rig: AggregatorRig, rng: random.Random, workers: dict[str, Signer]
) -> tuple[Mutator, list[bytes]]:
    """Seeds: 400 valid updates of enrolled workers f0..f2 (random deltas, int8 or raw floats,
    1..100 samples), each answering a task of its own; the mutator and the seeds."""
    model, job, incarnation = rig.model, rig.store.job_id, rig.aggregator.incarnation
    gen = torch.Generator().manual_seed(rng.randrange(2**32))
    seeds = []
    for i in range(400):
        wid, tid = f"f{i % 3}", f"seed{i:04d}"
        floats = torch.randn(model.spec.n_float, generator=gen) * 0.05
        _, body = make_update(
            workers[wid], model, task_id=tid, job_id=job, worker_id=wid, task=rig.token(tid), floats=floats,
            num_samples=rng.randint(1, 100), quant=rng.choice(["int8", "none"]),
        )  # fmt: skip
        seeds.append(body)
    worker_task = make_task(workers["f0"], job_id=job, incarnation=incarnation)[1]
    others = [
        make_task(OWNER, job_id=job, incarnation=incarnation)[1],
        encode(Hello("f0", ("cpu",), workers["f0"].fingerprint, "up", time.time()), workers["f0"]),
        encode(Round(job, 0, 1, 4, time.time() + 60), OWNER),
        encode(ModelAnnouncement(job, 1, 0, "0" * 64, "k", ("seed0001",), time.time()), MAKER),
        encode(Receipts(job, (Receipt(job, "seed0001", "f1", "applied", "", 1),)), MAKER),
        worker_task,
    ]

    def token(fields: dict[str, Any], rng: random.Random) -> Any:
        tid = fields["task_id"] if isinstance(fields.get("task_id"), str) else "seed0000"
        assert isinstance(tid, str)
        pick = rng.randrange(9)
        if pick == 0:
            return rig.token(uuid.uuid4().hex)  # another task's
        if pick == 1:
            return rig.token(tid, base_version=rng.choice([1, 2, 5, 10**6, -1, -(2**63), 2**63 - 1]))
        if pick == 2:
            return rig.token(tid, max_samples=rng.choice([1, -1, 10**15, 2**63 - 1]))
        if pick == 3:
            return token_of(make_task(OWNER, task_id=tid, job_id="job2", incarnation=incarnation)[1])
        if pick == 4:
            return token_of(make_task(OWNER, task_id=tid, job_id=job, incarnation="another")[1])
        if pick == 5:
            return token_of(make_task(workers["f1"], task_id=tid, job_id=job, incarnation=incarnation)[1])
        if pick == 6:
            return token_of(worker_task)
        if pick == 7:  # this task's token, garbled
            parts = msgpack.unpackb(rig.token(tid), raw=False)
            i = rng.randrange(1, 4)
            parts[i] = parts[i][:-1] if rng.random() < 0.5 else parts[i] + b"\0"
            return msgpack.packb(parts)
        return rig.token(tid, deadline=0.0, capability="gpu")  # expired, other capability: still its task

    n_float = model.spec.n_float

    def raw_floats(values: list[float]) -> bytes:
        return torch.tensor(values, dtype=torch.float32).numpy().tobytes()

    special: dict[str, Callable[[dict[str, Any], random.Random], Any]] = {
        "task": token,
        "task_id": lambda f, r: r.choice([uuid.uuid4().hex, f"seed{r.randrange(400):04d}", "", "x" * 300]),
        "job_id": lambda f, r: r.choice(["job2", "", job.upper(), job + " "]),
        "worker_id": lambda f, r: r.choice(["f0", "f1", "f2", "w9", ""]),
        "num_samples": lambda f, r: r.choice([0, -1, 1, 10**9, 10**15, 2**63 - 1, HUGE_INT, -(2**63)]),
        "base_version": lambda f, r: r.choice([-1, 1, 10**6, 2**63 - 1, HUGE_INT, -(2**63)]),
        "delta_key": lambda f, r: r.choice([f"jobs/{job}/updates/{uuid.uuid4().hex}.bin", f"jobs/{job}/updates/", "/etc/passwd", f"jobs/{job}/models/v000000.bin"]),
        "delta_size": lambda f, r: r.choice([0, -1, 60, HUGE_INT]),
        "metrics": lambda f, r: r.choice([{"train_loss": float("nan")}, {"a": float("inf")}, {str(i): 1.0 for i in range(500)}, {}]),
        "quant": lambda f, r: r.choice(["int8", "none", "fp4", "", "INT8"]),
        "block": lambda f, r: r.choice([0, -1, 1, 3, 256, 2**31, HUGE_INT]),
    }  # fmt: skip
    payloads: list[Callable[[bytes, random.Random], bytes]] = [
        lambda p, r: raw_floats([float("nan")] * n_float),
        lambda p, r: raw_floats([r.choice([float("inf"), 1e30, -1e30, 0.0]) for _ in range(n_float)]),
        lambda p, r: raw_floats([0.0] * n_float),
        lambda p, r: r.randbytes(4 * n_float),  # raw floats of any bits: often applied
        lambda p, r: r.randbytes(len(p)),
    ]

    def pick_signer(fields: dict[str, Any], rng: random.Random) -> Signer | None:
        wid = fields.get("worker_id")
        return workers[wid] if isinstance(wid, str) and wid in workers and rng.random() < 0.85 else None

    signers = [(workers["f0"], 0.2), (workers["f1"], 0.2), (workers["f2"], 0.2), (key(rng), 0.1)]
    signers += [(OWNER, 0.1), (MAKER, 0.1), (rig.aggregator.signer, 0.1)]
    mutator = Mutator(rng, seeds, others, signers, special, payloads, pick_signer)
    return mutator, seeds


async def rederive(rig: AggregatorRig, bodies: dict[str, bytes], applied: Counter[str]) -> int:
    """Re-derive every stored version from the updates its manifest lists (each one the test saw
    applied, none twice): same bytes; every version signed by the aggregator, chained. The last version."""
    ring, job, incarnation = rig.aggregator.keyring, rig.store.job_id, rig.aggregator.incarnation
    versions = await rig.store.versions()
    assert versions == list(range(len(versions)))
    core = AggregatorCore(rig.model, 0, rig.aggregator.policy, job)
    listed: Counter[str] = Counter()
    for v in versions[1:]:
        manifest = await rig.store.manifest(v)  # verifies the signature and the signer's role
        assert manifest.signer == rig.aggregator.signer.fingerprint
        assert (manifest.parent, manifest.incarnation) == (v - 1, incarnation)
        assert len(manifest.update_digests) == len(manifest.update_ids)
        for d, tid in zip(manifest.update_digests, manifest.update_ids, strict=True):
            listed[d] += 1
            update, _ = decode(bodies[d], ring, Update)
            bound = bind(update, ring, job, incarnation)
            assert isinstance(bound, tuple), bound
            assert isinstance(core.offer(bound[0]), Accepted) and bound[0].task_id == tid
        new = core.flush()
        assert hashlib.sha256(new.model.to_bytes()).hexdigest() == manifest.sha256, f"version {v}"
    assert listed == applied
    return versions[-1]


async def fuzz_aggregator(
    client: AnyTransport,
    names: Names,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    seed: int,
) -> None:
    t0 = time.monotonic()
    rng = random.Random(seed)
    with capture_logs():  # 10,000 warnings rendered would take longer than the test
        await _fuzz_aggregator(client, names, tmp_path, monkeypatch, n, rng, t0)


async def _fuzz_aggregator(
    client: AnyTransport,
    names: Names,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    rng: random.Random,
    t0: float,
) -> None:
    async with aggregator_rig(client, names, tmp_path, k=K, max_staleness=10_000) as rig:
        workers = {f"f{i}": key(rng) for i in range(3)}
        for wid, k in workers.items():
            rig.aggregator.keyring.add(k.public, Role.WORKER, worker_id=wid)
        mutator, seeds = aggregator_mutator(rig, rng, workers)
        bodies = seeds + [mutator.next() for _ in range(n - len(seeds))]
        rng.shuffle(bodies)
        print(f"aggregator: {n} messages made in {elapsed(t0)} ({dict(mutator.counts)})")
        tally = Tally([rig.service]).install(monkeypatch)
        dead = DeadLetters.from_inbox(rig.dead)
        await publish_all(rig.send, bodies)
        print(f"aggregator: published in {elapsed(t0)}")
        await settled(
            "the aggregator to settle or hold every message",
            lambda: tally.settled + len(rig.aggregator.held) == len(bodies),
            rig.check_alive,
        )
        # fill the last buffer with fresh valid updates, so that it becomes a version and is acked
        held = len(rig.aggregator.held)
        for _ in range((K - held) % K):
            body = make_update(workers["f0"], rig.model, **_fields_of(rig, "f0"))[1]
            bodies.append(body)
            await rig.send(body)
        await settled(
            "every message to be settled",
            lambda: tally.settled == len(bodies) and dead.count == sum(tally.dead.values()),
            rig.check_alive,
        )
        dead.close()
        print(f"aggregator: settled in {elapsed(t0)}; dead letters {dict(tally.reasons)}")
        rejected = sum(tally.dead.values())  # each rejection is written to the ledger after its dead letter
        await until(
            lambda: sum(r["fate"] == "rejected" for r in rig.ledger()) >= rejected, "the ledger", poll=0.2
        )
        await rig.stop_and_assert_all_acked()  # and nothing left in the updates queue
        sent = Counter(digest(b) for b in bodies)
        assert tally.acked + tally.dead == sent  # each message acked or dead-lettered, exactly once
        assert dead.got == tally.dead  # and every dead letter reached the dead-letter queue
        check_reasons(tally.reasons)
        ledger = rig.ledger()
        applied = Counter(r["digest"] for r in ledger if r["fate"] == "applied")
        rounds = Counter(d for d in tally.acked if d not in applied)  # acked, not applied: rounds only
        by_digest = {digest(b): b for b in bodies}
        for d in rounds:
            assert isinstance(decode(by_digest[d], rig.aggregator.keyring)[0], Round)
        assert applied + rounds == tally.acked
        assert sum(1 for r in ledger if r["fate"] == "rejected") == sum(tally.dead.values())
        last = await rederive(rig, by_digest, applied)
        seed_digests = {digest(b) for b in seeds}
        mutated = sum(1 for d in applied if d not in seed_digests)
        print(
            f"aggregator: {sum(applied.values())} applied ({mutated} mutated) in {last} versions; checked in {elapsed(t0)}"
        )
        assert sum(applied.values()) >= 400  # the seeds, at least, were applied


def _fields_of(rig: AggregatorRig, wid: str) -> dict[str, Any]:
    tid = uuid.uuid4().hex
    return {"task_id": tid, "job_id": rig.store.job_id, "worker_id": wid, "task": rig.token(tid)}


async def test_aggregator_fuzz(
    broker: RabbitMQ, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fuzz_aggregator(broker, names, tmp_path, monkeypatch, N, fuzz_seed(11))


# -- the coordinator --------------------------------------------------------------------------------


async def fuzz_coordinator(
    client: AnyTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, seed: int
) -> None:
    """Hellos of enrolled workers, announcements (of stored versions signed by the aggregator's key,
    of version 0 by the coordinator's, of versions stored unsigned or signed by a worker's key, of
    one that is not stored) and receipts, mutated; each sent where its kind goes (hellos to the
    workers exchange, the rest to the job's models exchange), some elsewhere."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    names = client.names
    job = names.job
    async with coordinator_rig(client, tmp_path) as rig:
        workers: dict[str, Signer] = {f"f{i}": key(rng) for i in range(3)}
        for wid, k in workers.items():
            rig.trust.add(k.public, Role.WORKER, worker_id=wid)
        store = rig.store
        _, blob = await store.load_bytes(0)
        v0 = await store.manifest(0)
        stored = [await save_version(store, blob, v, (f"seed{v}",), updates_total=v) for v in (1, 2, 3)]
        await save_version(store, blob, 4, signer=workers["f0"])  # not by a key that may make versions
        announcements = [encode(m.announcement(), MAKER) for m in stored]
        announcements += [encode(v0.announcement(), OWNER)]
        for v, (sha, key_) in {4: ("0" * 64, MAKER), 99: ("1" * 64, MAKER)}.items():
            fake = ModelAnnouncement(job, v, v - 1, sha, f"jobs/{job}/models/v{v:06d}.bin", (), time.time())
            announcements.append(encode(fake, key_))
        hellos = [
            encode(Hello(wid, ("cpu",), k.fingerprint, rng.choice(["up", "up", "down"]), time.time(), "0/3",
                         rng.random() < 0.5, tasks_received=3, tasks_completed=2), k)
            for wid, k in workers.items()
        ]  # fmt: skip
        receipts = [
            encode(
                Receipts(job, tuple(Receipt(job, f"seed{i}", "f0", "applied", "", 1) for i in range(3))),
                MAKER,
            ),
            encode(Receipt(job, "seed1", "f1", "rejected", "stale", 1, 3), MAKER),
        ]
        others = [
            make_update(workers["f0"], task_id="seed1", job_id=job, worker_id="f0")[1],
            make_task(OWNER, job_id=job)[1],
            encode(Round(job, 0, 1, 4, time.time() + 60), OWNER),
        ]
        seeds = hellos + announcements + receipts
        special: dict[str, Callable[[dict[str, Any], random.Random], Any]] = {
            "version": lambda f, r: r.choice([0, 1, 3, 4, 5, 99, -1, 10**9, HUGE_INT, 2**63 - 1]),
            "rollback_of": lambda f, r: r.choice([-1, 0, 1, 2**63 - 1, -(2**63)]),
            "sha256": lambda f, r: r.choice([m.sha256 for m in stored] + ["", "0" * 64]),
            "update_ids": lambda f, r: [f"seed{i}" for i in range(r.choice([0, 1, 1000]))],
            "job_id": lambda f, r: r.choice(["job2", "", job]),
            "worker_id": lambda f, r: r.choice([*workers, "w9", ""]),
            "capabilities": lambda f, r: r.choice([[], ["gpu"], ["cpu"] * 50, ["x" * 1000]]),
            "state": lambda f, r: r.choice(["up", "down", "", "sideways"]),
            "sent_at": lambda f, r: r.choice([float("nan"), float("inf"), -1.0, 0.0]),
            "receipts": lambda f, r: r.choice([[], [[job, "t", "f0", "applied", "", 1, 0]] * 300, [[1, 2]]]),
            "tasks_received": lambda f, r: r.choice([-1, HUGE_INT, 2**63 - 1]),
        }

        def pick_signer(fields: dict[str, Any], rng: random.Random) -> Signer | None:
            wid = fields.get("worker_id")
            return workers[wid] if isinstance(wid, str) and wid in workers and rng.random() < 0.8 else None

        signers = [(MAKER, 0.45), (OWNER, 0.15), (workers["f1"], 0.1), (workers["f2"], 0.1), (key(rng), 0.2)]
        mutator = Mutator(rng, seeds, others, signers, special, [], pick_signer)
        routes = {
            "hello": (names.workers_exchange, names.hello_key),
            "model": (names.models_exchange, Names.model_key(job)),
            "receipts": (names.models_exchange, Names.receipt_key(job)),
            "receipt": (names.models_exchange, Names.receipt_key(job)),
        }
        sends: list[tuple[bytes, tuple[str, str]]] = []
        for body in seeds:
            sends.append((body, routes[mutator.opened_kind(body)]))
        while len(sends) < n:
            body = mutator.next()
            route = routes[mutator.last_kind] if rng.random() < 0.85 else rng.choice(list(routes.values()))
            sends.append((body, route))
        rng.shuffle(sends)
        tally = Tally([rig.coordinator.transport]).install(monkeypatch)
        dead = await DeadLetters.on(client, names.dead_queue)

        async def send(item: tuple[bytes, tuple[str, str]]) -> None:
            body, (exchange, routing_key) = item
            await client.publish(exchange, routing_key, body)

        await publish_all(send, sends)  # type: ignore[arg-type]
        await settled(
            "every message to be settled",
            lambda: tally.settled == len(sends) and dead.count == sum(tally.dead.values()),
            rig.check_alive,
        )
        print(f"coordinator: {len(sends)} settled in {elapsed(t0)}; dead letters {dict(tally.reasons)}")
        rig.check_alive()
        # the versions it took: the stored ones signed by the aggregator's key, the newest last
        assert rig.coordinator.scheduler.version == 3
        assert rig.coordinator.latest is not None and rig.coordinator.latest.sha256 == stored[-1].sha256
        assert rig.coordinator.evaluator.recorded <= {0, 1, 2, 3}
    await assert_settled(client, names.coordinator_queue)  # the coordinator is gone: nothing came back
    sent = Counter(digest(b) for b, _ in sends)
    assert tally.acked + tally.dead == sent
    assert dead.got == tally.dead
    check_reasons(tally.reasons)
    assert tally.given_back == Counter()


async def test_coordinator_fuzz_in_memory(
    mem: MemoryTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fuzz_coordinator(mem, tmp_path, monkeypatch, N, fuzz_seed(12))


async def test_coordinator_fuzz(broker: RabbitMQ, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await fuzz_coordinator(broker, tmp_path, monkeypatch, N // 10, fuzz_seed(13))


# -- the worker ---------------------------------------------------------------------------------------


async def fuzz_worker(
    client: AnyTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, seed: int
) -> None:
    """Tasks of the coordinator's (20 seeds, each a task of its own), mutated and mostly re-signed by
    the coordinator's key; few of them are valid tasks it has not trained yet (training is the slow
    part), and none asks for more than two epochs. The worker trains each valid task once: every
    update it sends answers, with its token, a task the coordinator signed that the test sent."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    with capture_logs():  # the tracebacks of failed trainings, rendered, would take longer than the test
        await _fuzz_worker(client, tmp_path, monkeypatch, n, rng, t0)


async def _fuzz_worker(
    client: AnyTransport,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    rng: random.Random,
    t0: float,
) -> None:
    names = client.names
    async with worker_rig(client, tmp_path, start=True) as rig:
        job = names.job
        seeds = [make_task(OWNER, task_id=f"task{i:02d}", job_id=job)[1] for i in range(20)]
        others = [
            make_update(rig.signer, task_id="task01", job_id=job)[1],
            encode(Hello("w1", ("cpu",), rig.signer.fingerprint, "up", time.time()), rig.signer),
            encode(Round(job, 0, 1, 4, time.time() + 60), OWNER),
            encode(ModelAnnouncement(job, 1, 0, "0" * 64, "k", (), time.time()), MAKER),
        ]
        train = {
            "epochs": 1,
            "batch_size": 16,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 0.0,
        }

        def task_id(fields: dict[str, Any], r: random.Random) -> str:
            return r.choice(
                [uuid.uuid4().hex, f"task{r.randrange(20):02d}", "", "x" * 101, "é/..", "t" * 100]
            )

        special: dict[str, Callable[[dict[str, Any], random.Random], Any]] = {
            "task_id": task_id,
            "job_id": lambda f, r: r.choice(["job2", "", job + "x"]),
            "deadline": lambda f, r: r.choice([time.time() - 1, 0.0, -1e308, float("nan"), float("inf")]),
            "model_sha256": lambda f, r: r.choice(["", "0" * 64, "x" * 300]),
            "model_key": lambda f, r: r.choice(["", f"jobs/{job}/models/v000001.bin", "../../x"]),
            "train": lambda f, r: {**train, r.choice(["batch_size", "lr", "momentum", "optimizer", "epochs", "weight_decay"]):
                                   r.choice([0, -1, 1, 2, 10**9 if r.random() < 0.5 else 2, float("nan"), 1e30, "adam", "bogus"])},
            "quant": lambda f, r: r.choice(["int8", "none", "fp4", ""]),
            "block": lambda f, r: r.choice([0, -1, 1, 3, 256, 2**31]),
            "inline_limit": lambda f, r: r.choice([0, -1, 1, 10**9]),
            "base_version": lambda f, r: r.choice([-1, 10**6, 2**63 - 1]),
            "model_url": lambda f, r: r.choice(["", "not a url", "x" * 1000]),
        }  # fmt: skip

        def no_long_training(fields: dict[str, Any], rng: random.Random) -> Signer | None:
            cfg = fields.get("train")
            if isinstance(cfg, dict) and cfg.get("epochs") == 10**9:
                cfg["epochs"] = 2  # a coordinator may ask for a long training: not this test's business
            return None

        signers = [(OWNER, 0.7), (MAKER, 0.1), (rig.signer, 0.05), (key(rng), 0.15)]
        mutator = Mutator(rng, seeds, others, signers, special, [], no_long_training)
        bodies = seeds + [mutator.next() for _ in range(n - len(seeds))]
        rng.shuffle(bodies)
        tally = Tally([rig.transport]).install(monkeypatch)
        dead = DeadLetters.from_inbox(rig.dead)
        await publish_all(rig.send, bodies)
        await settled(
            "every task to be acked or dead-lettered",
            lambda: sum(tally.acked.values()) + dead.count == len(bodies),
            rig.check_alive,
        )
        dead.close()
        print(
            f"worker: {len(bodies)} settled in {elapsed(t0)}; trained {rig.app.trained}; dead letters "
            f"{dict(dead.by_reason)}; given back {sum(tally.given_back.values())}"
        )
        await rig.stop()
        updates = []
        while not rig.updates.got.empty():
            updates.append(rig.updates.got.get_nowait())
    sent = Counter(digest(b) for b in bodies)
    assert (
        tally.acked + dead.got == sent
    )  # acked, or dead-lettered by the worker or (past its delivery limit) the broker
    assert dead.got - dead.broker == tally.dead
    check_reasons(tally.reasons)
    tokens = {}
    for body in bodies:
        try:
            task, envelope = decode(body, trust(), Task)
        except WireError:
            continue
        tokens[task_token(envelope)] = task
    answered: Counter[str] = Counter()
    for d in updates:
        update, _ = decode(d.body, trust(workers={"w1": rig.signer}), Update)
        answers = tokens.get(update.task)
        assert answers is not None, "an update answers no task the coordinator signed"
        assert (update.task_id, update.job_id, update.base_version) == (
            answers.task_id,
            answers.job_id,
            answers.base_version,
        )
        answered[update.task_id] += 1
    assert all(c == 1 for c in answered.values()), "a task trained twice"
    assert len(answered) >= 20  # the seeds, at least


async def test_worker_fuzz_in_memory(
    mem: MemoryTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fuzz_worker(mem, tmp_path, monkeypatch, N, fuzz_seed(14))


async def test_worker_fuzz(broker: RabbitMQ, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await fuzz_worker(broker, tmp_path, monkeypatch, N // 10, fuzz_seed(15))
