"""Aggregator intake against the broker's ceiling, for 100k, 1M and 10M-parameter updates.

For each size, N real signed int8 updates are made once, then:

(a) ceiling: with plain aio-pika, publish the same N message bodies with publisher confirms
    (a window of W in flight) to a fresh quorum queue, and consume them on another connection
    with manual acks, nothing else. Time from the first publish to the last ack.
(a') the same, but through a fanout exchange into a quorum queue *and* a stream, as fedq's
    results exchange feeds ``<ns>.updates`` and ``<ns>.updates.log``: the broker writes each
    update twice, so this is the ceiling fedq's topology can reach (diagnostic only).
(b) intake: a real ``aggregator.service.Aggregator`` (LocalStore in a temp dir, v0 saved,
    async policy, its own connection), fed the same N bodies by the same publisher through
    the real topology (to the results exchange). Time from the first publish to the N-th
    update accepted (``core.updates_total + len(core.pending)``).

The publisher is a process of its own (``--feed``, started by this script and told when to
go), so the event loop measured is only the consumer's or the aggregator's. Each phase runs in a namespace of its own (``bench-<uuid>``), deleted at the end.
The aggregator is subclassed here (not changed) to time its handler (under its lock) and its
version writes, and its decode (before the lock) and offer get stopwatches, so the report says
where the time goes. ``--repeats R`` interleaves R runs of every phase and keeps the best of each.
``--profile`` adds one more intake run per size under cProfile (event loop thread), not
counted in the figures.

    .venv/bin/python benchmarks/intake.py [--json] [--quick] [--buffer K] [--repeats R] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import torch
from _common import (
    AMQP_URL,
    SIZES,
    broker_pid,
    cpu_seconds,
    delete_namespace,
    emit,
    machine,
    parser,
    save_v0,
    say,
    signed_updates,
    synthetic_state,
    table,
    trust,
    worker_keys,
)

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator
from broker_config.names import Names
from broker_config.topology import coordinator_inbox, topology
from shared.aggregation import Policy
from shared.codec import Envelope
from shared.ledger import JsonLines, read_lines
from shared.logs import configure_logging
from shared.messages import Message, Update
from shared.signing import Signer
from shared.store import LocalStore, ModelStore
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ

TARGET = 0.8
JOB = "bench"
INCARNATION = "bench-incarnation"  # version 0's, which every task carries
COUNTS = {"100k": 1000, "1M": 200, "10M": 30}
QUICK_COUNTS = {"100k": 300, "1M": 60, "10M": 12}


@dataclass
class Phase:
    """One timed run: N messages of ``size`` bytes from first publish to last consumed/accepted."""

    name: str
    count: int
    size: int
    seconds: float
    cpu_self: float  # this process, all threads
    cpu_broker: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.count / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.count * self.size / self.seconds / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "message_bytes": self.size,
            "seconds": self.seconds,
            "updates_per_s": self.per_s,
            "mb_per_s": self.mb_per_s,
            "cpu_self_s": self.cpu_self,
            "cpu_broker_s": self.cpu_broker,
            **self.extra,
        }


class CpuMeter:
    """CPU seconds of this process and of the broker over a phase."""

    def __init__(self) -> None:
        self.broker = broker_pid()

    def __enter__(self) -> CpuMeter:
        self.self0 = time.process_time()
        self.broker0 = cpu_seconds(self.broker) if self.broker else None
        return self

    def __exit__(self, *exc: object) -> None:
        self.self_s = time.process_time() - self.self0
        b1 = cpu_seconds(self.broker) if self.broker else None
        self.broker_s = b1 - self.broker0 if b1 is not None and self.broker0 is not None else None


async def publish_all(
    channel: aio_pika.abc.AbstractChannel, exchange: str, routing_key: str, bodies: list[bytes], window: int
) -> None:
    """Persistent, confirmed publishes with at most ``window`` awaiting their confirm."""
    ex = channel.default_exchange if not exchange else await channel.get_exchange(exchange, ensure=False)
    sem = asyncio.Semaphore(window)

    async def one(body: bytes) -> None:
        async with sem:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await ex.publish(message, routing_key, timeout=120)

    await asyncio.gather(*(one(b) for b in bodies))


def write_bodies(bodies: list[bytes]) -> Path:
    """The message bodies in one file (8-byte length, then the bytes), for the feeder process."""
    fd, name = tempfile.mkstemp(prefix="fedq-bench-bodies-")
    with os.fdopen(fd, "wb") as fh:
        for body in bodies:
            fh.write(len(body).to_bytes(8, "little"))
            fh.write(body)
    return Path(name)


def read_bodies(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 8], "little")
        out.append(data[i + 8 : i + 8 + n])
        i += 8 + n
    return out


async def feed_main(path: Path, exchange: str, routing_key: str, window: int, name: str) -> None:
    """The feeder process: connect, load the bodies, say ``ready``, publish on ``go``, say ``done``."""
    conn = await aio_pika.connect(AMQP_URL, client_properties={"connection_name": name})
    try:
        channel = await conn.channel(publisher_confirms=True)
        bodies = read_bodies(path)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await publish_all(channel, exchange, routing_key, bodies, window)
        print(f"done {time.process_time()}", flush=True)
    finally:
        await conn.close()


class Feeder:
    """The publisher, in a process of its own: the event loop measured (a consumer's or the
    aggregator's) is then not also the publisher's, as in a real deployment."""

    def __init__(self, path: Path, exchange: str, routing_key: str, window: int, name: str) -> None:
        self.args = ["--feed", str(path), "--feed-exchange", exchange, "--feed-key", routing_key]
        self.args += ["--window", str(window), "--feed-name", name]
        self.cpu_s = 0.0

    async def __aenter__(self) -> Feeder:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 300)
        if line.strip() != b"ready":
            raise SystemExit(f"the feeder did not start: {line!r}")
        return self

    async def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    async def finished(self) -> None:
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 600)).decode().split()
        if line[:1] == ["done"]:
            self.cpu_s = float(line[1])
        await self.proc.wait()

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def ceiling(
    names: Names, label: str, bodies: list[bytes], path: Path, window: int, prefetch: int, fanout: bool
) -> Phase:
    """Plain aio-pika: confirmed publishes to a fresh quorum queue, a manual-ack consumer."""
    queue = f"{names.namespace}.ceiling{'-fanout' if fanout else ''}"
    stream = f"{queue}.log"
    exchange = f"{names.namespace}.ceiling-x" if fanout else ""
    pub = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": f"bench-pub-{names.namespace}"}
    )
    con = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": f"bench-con-{names.namespace}"}
    )
    try:
        setup = await pub.channel()
        q = await setup.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        if fanout:
            ex = await setup.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, durable=True)
            s = await setup.declare_queue(
                stream, durable=True, arguments={"x-queue-type": "stream", "x-max-length-bytes": 2 * 1024**3}
            )
            await q.bind(ex)
            await s.bind(ex)
        cch = await con.channel()
        await cch.set_qos(prefetch_count=prefetch)
        cq = await cch.declare_queue(queue, passive=True)
        done = asyncio.Event()
        got = 0
        finished: list[float] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            await message.ack()
            got += 1
            if got == len(bodies):
                finished.append(time.perf_counter())
                done.set()

        tag = await cq.consume(on_message)
        key = queue if not fanout else ""
        async with Feeder(path, exchange, key, window, f"bench-pub-{names.namespace}") as feeder:
            with CpuMeter() as cpu:
                t0 = time.perf_counter()
                await feeder.go()
                await asyncio.wait_for(done.wait(), 600)
                seconds = finished[0] - t0
            await feeder.finished()
        await cq.cancel(tag)
        await con.close()
        with contextlib.suppress(Exception):
            await setup.queue_delete(queue)
            if fanout:
                await setup.queue_delete(stream)
                await setup.exchange_delete(exchange)
    finally:
        if not con.is_closed:
            await con.close()
        await pub.close()
    name = "ceiling (fanout: quorum + stream)" if fanout else "ceiling (quorum queue)"
    extra = {"cpu_feeder_s": feeder.cpu_s}
    return Phase(name, len(bodies), len(bodies[0]), seconds, cpu.self_s, cpu.broker_s, extra)


class TimedAggregator(Aggregator):
    """The real aggregator, with stopwatches around what one update costs it (behaviour unchanged)."""

    timings: defaultdict[str, float]
    calls: defaultdict[str, int]
    last_offer: float = 0.0

    def start_timing(self) -> None:
        self.timings = defaultdict(float)
        self.calls = defaultdict(int)

    async def handle(self, message: Message, envelope: Envelope, delivery: Delivery) -> None:
        t0 = time.perf_counter()
        await super().handle(message, envelope, delivery)
        self.timings["handler, lock held"] += time.perf_counter() - t0
        self.calls["handler, lock held"] += 1

    async def _flush(self) -> None:
        t0 = time.perf_counter()
        await super()._flush()
        self.timings["flush: store version, announce, ack"] += time.perf_counter() - t0
        self.calls["flush: store version, announce, ack"] += 1

    async def _catch_up(self, force: bool = False) -> bool:
        t0 = time.perf_counter()
        adopted = await super()._catch_up(force)
        self.timings["catch-up check"] += time.perf_counter() - t0
        return adopted


def instrument(agg: TimedAggregator) -> None:
    """Stopwatches on the aggregator's decode (module attribute) and its core's offer (instance
    attribute) for this process only; what they do is unchanged."""
    import shared.runtime as runtime_module

    real_decode = runtime_module.__dict__.setdefault("_bench_real_decode", runtime_module.__dict__["decode"])
    core = agg.core
    assert core is not None
    real_offer = core.offer

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_decode(*args, **kwargs)
        finally:
            agg.timings["decode + verify"] += time.perf_counter() - t0

    def timed_offer(update: Update) -> Any:
        t0 = time.perf_counter()
        try:
            result = real_offer(update)
        finally:
            agg.last_offer = time.perf_counter()  # the clock stops at the N-th accept, not when polled
            agg.timings["offer: dequantize, screen, accumulate"] += agg.last_offer - t0
        return result

    setattr(runtime_module, "decode", timed_decode)  # noqa: B010 (the module does not export it)
    core.offer = timed_offer  # type: ignore[method-assign]


@dataclass(frozen=True)
class Keys:
    """Who signs what: the coordinator (version 0, every update's task) and the workers."""

    coordinator: Signer
    workers: dict[str, Signer]


async def intake(
    names: Names,
    model: FlatModel,
    bodies: list[bytes],
    path: Path,
    keys: Keys,
    k: int,
    window: int,
    inbox: bool,
    profile: cProfile.Profile | None,
) -> Phase:
    """The real aggregator fed through the real broker; returns when the N-th update is accepted."""
    tmp = Path(tempfile.mkdtemp(prefix="fedq-bench-intake-"))
    admin = await RabbitMQ(AMQP_URL, names, f"bench-admin-{names.namespace}").connect()
    service = await RabbitMQ(AMQP_URL, names, f"bench-aggregator-{names.namespace}").connect()
    task: asyncio.Task[None] | None = None
    try:
        await admin.declare(topology(names))
        if inbox:  # the coordinator's durable inbox: receipts and announcements land in a quorum queue
            ch = await admin.connection.channel()
            box = coordinator_inbox(names)
            q = await ch.declare_queue(box.name, durable=True, arguments=dict(box.arguments))
            for key in (Names.model_key(JOB), Names.receipt_key(JOB)):
                await q.bind(names.models_exchange, key)
            await ch.close()
        signer = Signer.generate()
        ring = trust(keys.coordinator, keys.workers, [signer])
        store = ModelStore(LocalStore(tmp / "store"), JOB, ring)
        await save_v0(store, model, keys.coordinator, INCARNATION)
        agg = TimedAggregator(
            AggregatorConfig(Policy(mode="async", k=k, max_staleness=len(bodies) + 1)),
            transport=service,
            store=store,
            signer=signer,
            keyring=ring,
            ledger=JsonLines(tmp / "ledger.jsonl"),
        )
        await agg.load()
        agg.start_timing()
        instrument(agg)
        task = asyncio.create_task(agg.run())
        probe = await admin.connection.channel()
        for _ in range(500):
            declared = await probe.declare_queue(names.updates_queue, passive=True)
            if declared.declaration_result.consumer_count:
                break
            await asyncio.sleep(0.02)
        await probe.close()
        core = agg.core
        assert core is not None
        n = len(bodies)
        pub = Feeder(
            path, names.results_exchange, names.results_key, window, f"bench-feeder-{names.namespace}"
        )
        async with pub:
            with CpuMeter() as cpu:
                loop_cpu0 = time.thread_time()
                if profile is not None:
                    profile.enable()
                t0 = time.perf_counter()
                await pub.go()
                deadline = t0 + 600
                while core.updates_total + len(core.pending) < n:
                    if task.done() or time.perf_counter() > deadline:
                        rejected = [
                            r for r in read_lines(tmp / "ledger.jsonl") if r.get("fate") == "rejected"
                        ]
                        raise SystemExit(
                            f"intake stalled: aggregator done={task.done()}, rejected={rejected[:3]}"
                        )
                    await asyncio.sleep(0.002)
                # the N-th accept, timed in offer: a version written right after it (K = N) may hold
                # the loop before this poll wakes up, and must not count
                seconds = agg.last_offer - t0
                if profile is not None:
                    profile.disable()
                loop_cpu = time.thread_time() - loop_cpu0
            await pub.finished()
        for _ in range(6000):  # let a due version be written and acked before stopping (at most 60 s)
            if len(agg.held) < k:
                break
            await asyncio.sleep(0.01)
        handled = max(1, agg.calls["handler, lock held"])
        per_update_ms = {k: v / n * 1e3 for k, v in agg.timings.items()}
        extra = {
            "buffer_k": k,
            "versions_written_during": agg.calls["flush: store version, announce, ack"],
            "coordinator_inbox_bound": inbox,
            "loop_thread_cpu_share": loop_cpu / seconds,
            "aggregator_busy_share": agg.timings["handler, lock held"] / seconds,
            "per_update_ms": per_update_ms,
            "handler_calls": handled,
            "cpu_feeder_s": pub.cpu_s,
        }
        return Phase("intake (fedq aggregator)", n, len(bodies[0]), seconds, cpu.self_s, cpu.broker_s, extra)
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await service.close()
        await admin.close()
        shutil.rmtree(tmp, ignore_errors=True)  # the store and ledger of this run only


async def fresh(phase: Callable[[Names], Awaitable[Phase]]) -> Phase:
    """Run one phase in a namespace of its own, deleted afterwards (whatever it left unacked goes too)."""
    names = Names(f"bench-{uuid.uuid4().hex[:10]}", JOB)
    try:
        return await phase(names)
    finally:
        await delete_namespace(names, job_ids=(JOB,))


def best(phases: list[Phase]) -> Phase:
    return min(phases, key=lambda ph: ph.seconds)


async def run_size(
    label: str,
    count: int,
    k_arg: int,
    window: int,
    inbox: bool,
    fanout: bool,
    profile: bool,
    repeats: int,
) -> dict[str, Any]:
    n = SIZES[label]
    model = FlatModel.from_state_dict(synthetic_state(n))
    keys = Keys(Signer.generate(), worker_keys(50))
    bodies = signed_updates(model, count, keys.workers, keys.coordinator, JOB, INCARNATION)
    path = write_bodies(bodies)
    k = k_arg if k_arg > 0 else count  # default: one version, written after the last update
    prefetch = max(4 * k, 64)  # what the aggregator asks for (aggregator/service.py)
    prof = cProfile.Profile() if profile else None
    runs: dict[str, list[Phase]] = defaultdict(list)
    for _ in range(repeats):  # interleaved, so that a burst of load elsewhere hits all phases alike
        runs["ceiling"].append(
            await fresh(lambda ns: ceiling(ns, label, bodies, path, window, prefetch, fanout=False))
        )
        if fanout:
            runs["ceiling_fanout"].append(
                await fresh(lambda ns: ceiling(ns, label, bodies, path, window, prefetch, fanout=True))
            )
        runs["intake"].append(
            await fresh(lambda ns: intake(ns, model, bodies, path, keys, k, window, inbox, None))
        )
    if prof is not None:  # one more intake run under the profiler, not counted in the figures
        await fresh(lambda ns: intake(ns, model, bodies, path, keys, k, window, inbox, prof))
    path.unlink()
    a, b = best(runs["ceiling"]), best(runs["intake"])
    out: dict[str, Any] = {
        "label": label,
        "params": n,
        "count": count,
        "message_bytes": len(bodies[0]),
        "prefetch": prefetch,
        "repeats": repeats,
        "all_seconds": {key: [ph.seconds for ph in phs] for key, phs in runs.items()},
        "ratio": b.per_s / a.per_s,
    }
    for key, phs in runs.items():
        out[key] = best(phs).to_dict()
    if fanout:
        out["ratio_to_fanout_ceiling"] = b.per_s / best(runs["ceiling_fanout"]).per_s
    if prof is not None:
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(18)
        out["profile_tottime"] = text.getvalue()
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values())  # tottime over every function: the loop thread's wall
        idle = sum(v[2] for key, v in raw.items() if key[2] == "<method 'poll' of 'select.epoll' objects>")
        out["profile_loop_idle_share"] = idle / total if total else None
    return out


async def main_async() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--sizes", default="100k,1M,10M", help="comma-separated of 100k, 1M, 10M")
    p.add_argument(
        "--count", type=int, default=0, help="updates per size (default 1000/200/30, quick 300/60/12)"
    )
    p.add_argument("--buffer", type=int, default=0, help="aggregator K (default: N, one version at the end)")
    p.add_argument("--window", type=int, default=8, help="publishes awaiting their confirm (default 8)")
    p.add_argument("--no-inbox", dest="inbox", action="store_false", help="no coordinator inbox bound")
    p.add_argument("--no-fanout", dest="fanout", action="store_false", help="skip the fanout ceiling")
    p.add_argument("--profile", action="store_true", help="an extra intake run per size under cProfile")
    p.add_argument("--feed", help=argparse.SUPPRESS)  # internal: run as the feeder process
    p.add_argument("--feed-exchange", default="", help=argparse.SUPPRESS)
    p.add_argument("--feed-key", default="", help=argparse.SUPPRESS)
    p.add_argument("--feed-name", default="bench-feeder", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per phase; the best counts")
    args = p.parse_args()
    if args.feed:
        await feed_main(Path(args.feed), args.feed_exchange, args.feed_key, args.window, args.feed_name)
        return
    torch.set_num_threads(1)
    configure_logging(
        "warning", json=False
    )  # the service runs at info; nothing per update is logged above debug
    counts = QUICK_COUNTS if args.quick else COUNTS
    labels = args.sizes.split(",")
    results = []
    for label in labels:
        count = args.count or counts[label]
        say(f"{label}: {count} updates ...")
        results.append(
            await run_size(
                label,
                count,
                args.buffer,
                args.window,
                args.inbox,
                args.fanout,
                args.profile,
                args.repeats,
            )
        )

    k_text = f"K={args.buffer}" if args.buffer else "K=N (one version, after the last update)"
    say(
        f"\nintake vs broker ceiling; async policy {k_text}; {args.window} publishes in flight; publisher in a process of its own"
    )
    rows = []
    for r in results:
        for key in ("ceiling", "ceiling_fanout", "intake"):
            if key in r:
                ph = r[key]
                rows.append(
                    [
                        r["label"],
                        ph["name"],
                        ph["count"],
                        f"{ph['message_bytes']:,}",
                        ph["seconds"],
                        ph["updates_per_s"],
                        ph["mb_per_s"],
                        ph["cpu_self_s"],
                        ph["cpu_broker_s"],
                    ]
                )
    say(table(["size", "phase", "N", "bytes", "s", "updates/s", "MB/s", "cpu self s", "cpu broker s"], rows))
    say("")
    say(
        table(
            [
                "size",
                "intake/ceiling",
                "intake/fanout ceiling",
                "agg busy",
                "loop cpu",
                "versions",
            ],
            [
                [
                    r["label"],
                    r["ratio"],
                    r.get("ratio_to_fanout_ceiling"),
                    r["intake"]["aggregator_busy_share"],
                    r["intake"]["loop_thread_cpu_share"],
                    r["intake"]["versions_written_during"],
                ]
                for r in results
            ],
        )
    )
    say("\nwhere the aggregator's time goes, ms per update (wall, from its own handler):")
    keys = sorted({k for r in results for k in r["intake"]["per_update_ms"]})
    say(
        table(
            ["size", *keys],
            [[r["label"], *(r["intake"]["per_update_ms"].get(k) for k in keys)] for r in results],
        )
    )
    for r in results:
        if "profile_tottime" in r:
            say(
                f"\ncProfile of the event loop thread during an extra intake run at {r['label']}: waiting in "
                f"epoll {r['profile_loop_idle_share']:.0%} of the time; top functions by own time:"
            )
            say(r["profile_tottime"])
    min_ratio = min(r["ratio"] for r in results)
    say(
        f"min intake/ceiling ratio {min_ratio:.3f}; target >= {TARGET}: "
        + ("holds" if min_ratio >= TARGET else "does NOT hold")
    )
    emit(
        {
            "benchmark": "intake",
            "min_ratio": min_ratio,
            "target": TARGET,
            "target_met": min_ratio >= TARGET,
            "buffer": args.buffer or "N",
            "window": args.window,
            "coordinator_inbox_bound": args.inbox,
            "results": [{k: v for k, v in r.items() if k != "profile_tottime"} for r in results],
            "machine": machine(),
            "pid": os.getpid(),
        },
        args.json,
    )


if __name__ == "__main__":
    asyncio.run(main_async())
