"""The real local RabbitMQ as the tests use it: a namespace's cleanup."""

from __future__ import annotations

import aio_pika

from broker_config.names import Names
from broker_config.topology import topology


async def delete_namespace(
    amqp_url: str, names: Names, capabilities: tuple[str, ...], jobs: tuple[str, ...] = ()
) -> None:
    """Delete the namespace's exchanges and shared queues, and the queues of ``names.job`` and ``jobs``."""
    conn = await aio_pika.connect(amqp_url)
    try:
        topo = topology(names, capabilities)
        queues = [q.name for j in {names.job, *jobs} for q in topology(names.for_job(j), capabilities).queues]
        queues += [names.for_job(j).coordinator_queue for j in {names.job, *jobs}]
        for q in dict.fromkeys(queues):
            ch = await conn.channel()
            try:
                await ch.queue_delete(q)
            except Exception:
                pass
            finally:
                if not ch.is_closed:
                    await ch.close()
        for ex in topo.exchanges:
            ch = await conn.channel()
            try:
                await ch.exchange_delete(ex.name)
            except Exception:
                pass
            finally:
                if not ch.is_closed:
                    await ch.close()
    finally:
        await conn.close()
