"""A claim-checked update is taken only at the store key the coordinator signed into the task it
answers (``aggregator.binding``), so a worker cannot point its update at another task's or
another worker's object."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path

import torch

from aggregator.binding import bind
from aggregator.core import Rejected
from broker_config.names import Names
from shared.codec import encode
from shared.messages import Update
from shared.quantize import encode_delta
from shared.reasons import Reason
from shared.store import model_key, update_key
from shared.transport.rabbitmq import RabbitMQ
from tests.support.messages import JOB, OWNER, an_update, make_task, token_of, trust
from tests.support.rigs import aggregator_rig

# -- the aggregator: a claim check at its task's key only -------------------------------------------


def test_a_claim_check_must_name_the_key_signed_into_its_task() -> None:
    """``bind`` takes a claim check only at the update key its task names: not another task's key,
    not another key under the job's updates, not a key a task that names none would have had."""
    keyring, incarnation = trust(), "inc"
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex

    def claim(key: str, task_key: str | None = None) -> object:
        _, raw = make_task(OWNER, task_id=mine, incarnation=incarnation, update_key=task_key)
        update = dataclasses.replace(
            an_update(task_id=mine, task=token_of(raw)),
            delta=b"",
            delta_key=key,
            delta_sha256="0" * 64,
            delta_size=9,
        )
        return bind(update, keyring, JOB, incarnation)

    bound = claim(update_key(JOB, mine))
    assert isinstance(bound, tuple) and bound[0].delta_key == update_key(JOB, mine)
    for key, task_key in (
        (update_key(JOB, other), None),  # another task's update
        (f"jobs/{JOB}/updates/{mine}.bin.x", None),
        (f"jobs/{JOB}/updates/", None),
        (model_key(JOB, 0), None),
        (update_key(JOB, mine), ""),  # its task names no key: no claim check at all
        (update_key(JOB, mine), update_key(JOB, other)),  # the coordinator named another key
    ):
        rejected = claim(key, task_key)
        assert isinstance(rejected, Rejected) and rejected.reason is Reason.BAD_PAYLOAD, (key, rejected)
        assert key in rejected.detail


async def test_an_update_naming_another_tasks_key_is_dead_lettered(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """A hostile worker answers its own task with a claim check at the key of another task's update
    (bytes and digest right): dead-lettered as bad_payload, the model unchanged; the update that
    belongs there is then applied as usual."""
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        spec = rig.model.spec
        delta = encode_delta(
            torch.full((spec.n_float,), 0.01), torch.zeros(spec.n_exact, dtype=torch.int64), spec, "int8", 256
        )
        honest, hostile = uuid.uuid4().hex, uuid.uuid4().hex
        await rig.store.objects.put(update_key(JOB, honest), delta)
        key, digest = update_key(JOB, honest), hashlib.sha256(delta).hexdigest()

        def claim(task_id: str) -> Update:
            """An update of ``task_id`` whose delta is the one at the honest task's key."""
            update = an_update(task_id=task_id, task=rig.token(task_id))
            return dataclasses.replace(
                update, delta=b"", delta_key=key, delta_sha256=digest, delta_size=len(delta)
            )

        stolen = claim(hostile)
        body = encode(stolen, rig.worker)
        await rig.send(body)
        entry = await rig.rejected(body, "bad_payload", hostile)
        assert update_key(JOB, hostile) in entry["detail"] and update_key(JOB, honest) in entry["detail"]
        await rig.assert_version(0)
        await rig.send(encode(claim(honest), rig.worker))
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (honest,)
        await rig.stop_and_assert_all_acked()
