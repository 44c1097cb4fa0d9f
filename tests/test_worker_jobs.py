"""A worker that serves several jobs of its app (``--job a,b``), on the in-memory broker: it takes
each job's tasks from that job's queue, sends each update to its own job's aggregator, and says
hello to each job's coordinator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from broker_config.topology import topology
from shared.codec import decode
from shared.messages import Hello, Update
from shared.signing import Keyring, Role
from shared.transport import Delivery
from shared.transport.memory import MemoryTransport
from tests.support.broker import Inbox
from tests.support.messages import make_task
from tests.support.rigs import worker_rig
from tests.support.waiting import until


async def test_one_worker_trains_for_two_jobs_and_keeps_their_updates_apart(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    own, other = mem.names, mem.names.for_job("other-job")
    await mem.declare(topology(other))
    other_updates = await Inbox.on(mem, other.updates_queue)
    hellos: dict[str, list[str]] = {own.job: [], other.job: []}

    def hello_inbox(job: str) -> Callable[[Delivery], Awaitable[None]]:
        async def on_hello(d: Delivery) -> None:
            await d.ack()
            hello, _ = decode(d.body, ring, Hello)
            assert isinstance(hello, Hello)
            hellos[job].append(hello.worker_id)

        return on_hello

    ring = Keyring()
    for names in (own, other):
        await mem.subscribe(names.workers_exchange, (names.hello_key,), hello_inbox(names.job))
    async with worker_rig(mem, tmp_path, jobs=(own.job, other.job), heartbeat_interval=0.05) as r:
        ring.add(r.signer.public, Role.WORKER, worker_id="w1")
        await r.start()
        mine = await r.send_task()
        theirs, body = make_task(r.coordinator, job_id=other.job)
        await mem.publish(other.tasks_exchange, other.task_key("cpu"), body)
        update, _ = await r.next_update()
        assert update.task_id == mine.task_id and update.job_id == own.job
        delivery = await other_updates.next()
        their_update, _ = decode(delivery.body, ring, Update)
        assert isinstance(their_update, Update)
        assert (their_update.task_id, their_update.job_id) == (theirs.task_id, other.job)
        await r.updates.expect_none()  # nothing of the other job on this job's queue
        await until(lambda: all(hellos.values()), "hellos to both jobs' coordinators")
        assert set(hellos[own.job]) == set(hellos[other.job]) == {"w1"}
        assert r.app.trained == 2
