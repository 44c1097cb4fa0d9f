"""``fedq audit`` against the real broker: what it reads from the update log and the updates queue."""

from __future__ import annotations

from typing import Any

import pytest

from broker_config.names import Names
from fedq.audit import read_update_log
from shared.codec import encode
from shared.messages import Receipt, Update
from shared.signing import Signer
from shared.transport.rabbitmq import RabbitMQ
from tests.support.messages import an_update


def plain_update(task_id: str, job_id: str, worker_id: str) -> Update:
    return an_update(task_id=task_id, job_id=job_id, worker_id=worker_id, quant="none", delta=b"\x00" * 8)


async def test_update_log_names_each_update_of_the_job_and_counts_the_queue(
    broker: RabbitMQ, names: Names, amqp_url: str, signer: Signer
) -> None:
    sent = [
        plain_update("t1", "job-a", "w1"),
        plain_update("t2", "job-a", "w2"),
        plain_update("t3", "job-b", "w1"),  # another job's
        plain_update("t1", "job-a", "w1"),  # sent again
    ]
    for message in sent:
        await broker.publish(names.results_exchange, names.results_key, encode(message, signer))
    await broker.publish(names.results_exchange, names.results_key, b"not an envelope")
    await broker.publish(
        names.results_exchange, names.results_key, encode(Receipt("job-a", "t9", "w3", "applied", "", 1), signer)
    )
    log, in_queue = await read_update_log(broker, "job-a", idle=1.0)
    assert log == {"t1": "w1", "t2": "w2"}
    assert in_queue == 6  # the updates queue is bound to the same exchange: everything waits there


async def test_an_update_that_arrives_while_the_log_is_read_is_counted_in_both(
    broker: RabbitMQ, names: Names, amqp_url: str, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker outside the run may still send an update as the audit reads: it must be in the
    log and in the queue count alike, or the balance calls it lost."""
    await broker.publish(names.results_exchange, names.results_key, encode(plain_update("t1", "job-a", "w1"), signer))
    real_read = broker.read_all
    late = [plain_update("t2", "job-a", "w2")]

    async def read_then_one_more_arrives(*args: Any, **kwargs: Any) -> Any:
        entries = await real_read(*args, **kwargs)
        if late:
            await broker.publish(names.results_exchange, names.results_key, encode(late.pop(), signer))
        return entries

    monkeypatch.setattr(broker, "read_all", read_then_one_more_arrives)
    log, in_queue = await read_update_log(broker, "job-a", idle=1.0)
    assert (log, in_queue) == ({"t1": "w1", "t2": "w2"}, 2)
