"""What one more connection, update and version cost the broker and the store (docs/scale.md).

    .venv/bin/python benchmarks/limits.py [--json] [--quick]

1. **Per connection** (a worker replica holds one): the broker's memory (RSS of its process)
   before and after opening N connections the way a worker does (a confirmed channel to publish, a
   channel consuming its task queue with prefetch 1), divided by N; and this client's.
2. **Per update on the broker**: updates of a 100k-parameter model (int8, ~101 kB) published with
   confirms to the results exchange, which puts each in the job's quorum queue and the update log
   stream, then consumed and acked: updates/s and MB/s each way, the broker's CPU seconds per 1000.
3. **Per version in the store**: a 100k-parameter version (model, manifest) saved to a local store:
   bytes and milliseconds each.

Real broker at 127.0.0.1:5672 (FEDQ_AMQP_URL), a namespace of its own, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from _common import (
    AMQP_URL,
    broker_pid,
    cpu_seconds,
    delete_namespace,
    emit,
    machine,
    parser,
    rss_kib,
    say,
    signed_updates,
    synthetic_state,
    table,
    worker_keys,
)

from broker_config.names import Names
from broker_config.topology import topology
from shared.signing import Signer
from shared.store import LocalStore, Manifest, ModelStore, model_key
from shared.tensors import FlatModel
from shared.transport.rabbitmq import RabbitMQ


def shared_broker_pid() -> int | None:
    """The broker at 127.0.0.1:5672: the RabbitMQ VM not started by a test (whose node names start
    with fedq-test)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                if cmd.split(b"\0")[0].endswith(b"beam.smp") and b"rabbit" in cmd and b"fedq-test" not in cmd:
                    return int(proc.name)
    return broker_pid()


async def per_connection(names: Names, count: int) -> dict[str, Any]:
    pid = shared_broker_pid()
    client_before = rss_kib(os.getpid()) or 0
    before = rss_kib(pid) if pid else None
    connections = []
    for i in range(count):
        conn = await aio_pika.connect(AMQP_URL, client_properties={"connection_name": f"bench-limits-{i}"})
        await conn.channel(publisher_confirms=True)
        consumer = await conn.channel()
        await consumer.set_qos(prefetch_count=1)
        queue = await consumer.get_queue(names.task_queue("cpu"), ensure=False)
        await queue.consume(lambda m: m.nack(requeue=True))
        connections.append(conn)
    await asyncio.sleep(2.0)  # let the broker's accounting settle
    after = rss_kib(pid) if pid else None
    client_after = rss_kib(os.getpid()) or 0
    for conn in connections:
        await conn.close()
    return {
        "connections": count,
        "broker_kib_per_connection": None if before is None or after is None else round((after - before) / count, 1),
        "client_kib_per_connection": round((client_after - client_before) / count, 1),
    }


async def per_update(names: Names, count: int) -> dict[str, Any]:
    model = FlatModel.from_state_dict(synthetic_state(100_000))
    bodies = signed_updates(model, count, worker_keys(1), Signer.generate(), names.job)
    size = len(bodies[0])
    transport = await RabbitMQ(AMQP_URL, names, "bench-limits").connect()
    pid = shared_broker_pid()
    try:
        cpu0, t0 = cpu_seconds(pid) if pid else None, time.perf_counter()
        for i in range(0, count, 64):  # 64 publishes in flight, each awaiting its confirm
            await asyncio.gather(
                *(transport.publish(names.results_exchange, names.results_key, b) for b in bodies[i : i + 64])
            )
        published = time.perf_counter() - t0
        got = 0
        done = asyncio.Event()
        t1 = time.perf_counter()

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            await message.ack()
            got += 1
            if got == count:
                done.set()

        channel = await transport.connection.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.get_queue(names.updates_queue, ensure=False)
        await queue.consume(take)
        await asyncio.wait_for(done.wait(), 600)
        consumed = time.perf_counter() - t1
        cpu1 = cpu_seconds(pid) if pid else None
        await channel.close()
    finally:
        await transport.close()
    return {
        "updates": count,
        "update_bytes": size,
        "published_per_second": round(count / published, 1),
        "publish_mb_per_second": round(count * size / published / 1e6, 1),
        "consumed_per_second": round(count / consumed, 1),
        "broker_cpu_per_1000_updates": None if cpu0 is None or cpu1 is None else round((cpu1 - cpu0) / count * 1000, 3),
    }


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def per_version(count: int) -> dict[str, Any]:
    model = FlatModel.from_state_dict(synthetic_state(100_000))
    blob = model.to_bytes()
    signer = Signer.generate()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(LocalStore(Path(tmp)), "bench")
        t0 = time.perf_counter()
        for v in range(count):
            manifest = Manifest(
                job_id="bench",
                version=v,
                parent=v - 1,
                sha256=hashlib.sha256(blob).hexdigest(),
                size=len(blob),
                key=model_key("bench", v),
                update_ids=tuple(uuid.uuid4().hex for _ in range(10)),
                update_digests=tuple(hashlib.sha256(str(i).encode()).hexdigest() for i in range(10)),
                created_at=time.time(),
            ).signed_by(signer)
            await store.save(manifest, blob)
        seconds = time.perf_counter() - t0
        stored = await asyncio.to_thread(tree_bytes, Path(tmp))
    return {"versions": count, "bytes_per_version": stored // count, "ms_per_version": round(seconds / count * 1000, 2)}


async def main() -> None:
    args = parser(__doc__ or "").parse_args()
    names = Names(f"bench-limits-{uuid.uuid4().hex[:6]}", "limits")
    conn = await RabbitMQ(AMQP_URL, names, "bench-limits-declare").connect()
    await conn.declare(topology(names, ("cpu",)))
    await conn.close()
    try:
        connections = await per_connection(names, 50 if args.quick else 300)
        say("per connection:", connections)
        updates = await per_update(names, 200 if args.quick else 3000)
        say("per update:", updates)
    finally:
        await delete_namespace(names)
    versions = await per_version(20 if args.quick else 200)
    say("per version:", versions)
    rows = [
        ["broker memory per connection (KiB)", connections["broker_kib_per_connection"]],
        ["client memory per connection (KiB)", connections["client_kib_per_connection"]],
        [f"updates/s published with confirms ({updates['update_bytes']} B)", updates["published_per_second"]],
        ["updates/s consumed and acked", updates["consumed_per_second"]],
        ["broker CPU-s per 1000 updates", updates["broker_cpu_per_1000_updates"]],
        ["store bytes per 100k-parameter version", versions["bytes_per_version"]],
        ["store ms per version (local)", versions["ms_per_version"]],
    ]
    print(table(["unit cost", "measured"], rows))
    emit({"machine": machine(), "per_connection": connections, "per_update": updates, "per_version": versions}, args.json)


if __name__ == "__main__":
    asyncio.run(main())
