"""Workers without store credentials: a task's presigned URLs reach its model (GET) and its own
update key (PUT, of the update's exact size) until the task's deadline, and nothing else; the
aggregator takes a claim check only at the key the coordinator signed into the task.

The URLs are tried against the tests' S3 API server (moto, behind ``tests.support.s3gate``, which
checks presigned URLs as S3 does: moto itself does not)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import urllib.error
import urllib.request
import uuid
from calendar import timegm
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch

from aggregator.binding import bind
from aggregator.core import Rejected
from broker_config.names import Names
from coordinator.config import CoordinatorConfig
from coordinator.tasks import Latest, TaskMaker
from shared.codec import encode
from shared.messages import Update
from shared.quantize import encode_delta, payload_size
from shared.reasons import Reason
from shared.s3 import S3Store
from shared.store import Manifest, ModelStore, model_key, update_key
from shared.tensors import FlatModel
from shared.transport.rabbitmq import RabbitMQ
from tests.support.messages import JOB, OWNER, an_update, make_task, token_of, trust
from tests.support.rigs import aggregator_rig
from tests.support.s3server import S3Server, s3server_fixture  # noqa: F401 - the s3server fixture
from tests.support.tiny import LinearApp

TTL = 60.0


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def store_for(server: S3Server, prefix: str) -> S3Store:
    return S3Store(
        f"s3://{server.bucket}/{prefix}",
        endpoint=server.endpoint,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )


def call(method: str, url: str, data: bytes | None = None, **headers: str) -> tuple[int, bytes]:
    """One plain HTTP request, with no credentials: what a worker can do with a URL it holds."""
    # as a worker sends it (urllib would say the bytes are a form, which the server then parses)
    headers = {"Content-Type": "application/octet-stream", **headers} if data is not None else headers
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def other_key(url: str, key: str, other: str) -> str:
    """``url`` with its object's key changed to ``other`` (its signature kept)."""
    assert key in url
    return url.replace(key, other)


def amz(url: str, name: str) -> str:
    return parse_qs(urlsplit(url).query)[f"X-Amz-{name}"][0]


def signed_at(url: str) -> float:
    return timegm(time.strptime(amz(url, "Date"), "%Y%m%dT%H%M%SZ"))


async def job_on_s3(store: S3Store, job: str) -> Latest:
    """Version 0 of the tiny app's model in ``store``, as the coordinator hands it out."""
    blob = FlatModel.from_state_dict(LinearApp().build_model(0).state_dict()).to_bytes()
    manifest = Manifest.first(job, blob, time.time())
    await ModelStore(store, job).save(manifest, blob)
    return Latest(0, manifest.sha256, manifest.key, blob)


def maker(
    store: S3Store, job: str, inline_limit: int = 0, quant: str = "int8", block: int = 256
) -> TaskMaker:
    """The coordinator's task maker for ``job`` on ``store`` (by default, nothing inline)."""
    config = CoordinatorConfig(job_id=job, inline_limit=inline_limit, quant=quant, block=block)
    return TaskMaker(config, ModelStore(store, job))


def a_delta(latest: Latest, scheme: str = "int8", block: int = 256) -> bytes:
    spec = FlatModel.from_bytes(latest.blob).spec
    return encode_delta(
        torch.full((spec.n_float,), 0.01), torch.zeros(spec.n_exact, dtype=torch.int64), spec, scheme, block
    )


# -- what a worker can do with its URLs ------------------------------------------------------------


async def test_a_tasks_urls_reach_its_model_and_its_own_update_key_only(s3server: S3Server) -> None:
    """The PUT URL stores the update, of its exact size, at the task's own key; changed to another
    key, used with another method or size, or with a copy header, it is refused and nothing
    changes. The GET URL reads the model and nothing else. Without a URL, nothing is reachable."""
    prefix, job = unique("urls"), unique("job")
    async with store_for(s3server, prefix) as store:
        latest = await job_on_s3(store, job)
        tasks = maker(store, job)
        task = await tasks.make(latest, "cpu", -1, TTL, time.time())
        neighbour = await tasks.make(latest, "cpu", -1, TTL, time.time())
        assert task.update_key == update_key(job, task.task_id) != neighbour.update_key
        full = f"{prefix}/{task.update_key}"
        assert urlsplit(task.update_url).path == f"/{s3server.bucket}/{full}"
        delta = a_delta(latest)
        assert len(delta) == payload_size(FlatModel.from_bytes(latest.blob).spec, "int8", 256)

        put = task.update_url
        theirs = other_key(put, task.update_key, neighbour.update_key)
        model = other_key(put, task.update_key, latest.key)
        assert call("PUT", theirs, delta)[0] == 403  # another task's key
        assert call("PUT", model, delta)[0] == 403  # the model
        assert call("PUT", put, delta + b"\0" * 1000)[0] == 403  # more than the update's size
        assert call("PUT", put, delta[:-1])[0] == 403
        copy = f"{s3server.bucket}/{prefix}/{latest.key}"  # the model copied into its key
        assert call("PUT", put, b"", **{"x-amz-copy-source": copy})[0] == 403
        assert not await store.exists(task.update_key) and not await store.exists(neighbour.update_key)

        status, body = call("PUT", put, delta)
        assert status == 200, body
        assert await store.get(task.update_key) == delta
        for method in ("GET", "HEAD", "DELETE"):
            assert call(method, put)[0] == 403, method
        assert call("PUT", put + "&acl=", delta)[0] == 403  # a sub-resource is another request
        assert await store.get(task.update_key) == delta

        get = task.model_url
        status, body = call("GET", get)
        assert status == 200 and body == latest.blob
        assert call("GET", other_key(get, latest.key, task.update_key))[0] == 403
        assert call("PUT", get, b"junk")[0] == 403
        assert call("DELETE", get)[0] == 403
        bare = f"{s3server.endpoint}/{s3server.bucket}/{prefix}/{latest.key}"
        assert call("GET", bare)[0] == 403  # the bucket is private: no signature, no object
        assert await store.get(latest.key) == latest.blob
        assert s3server.secret_key not in put + get


async def test_a_tasks_urls_expire_with_the_task(s3server: S3Server) -> None:
    """A task's URLs live as long as the task (to the second), not longer: once its deadline has
    passed, its PUT URL stores nothing."""
    prefix, job = unique("expiry"), unique("job")
    async with store_for(s3server, prefix) as store:
        latest = await job_on_s3(store, job)
        now = time.time()
        long = await maker(store, job).make(latest, "cpu", -1, 120.0, now)
        for url in (long.model_url, long.update_url):
            assert long.deadline <= signed_at(url) + int(amz(url, "Expires")) <= long.deadline + 2, url
        task = await maker(store, job).make(latest, "cpu", -1, 0.5, time.time())
        await asyncio.sleep(
            max(0.0, signed_at(task.update_url) + int(amz(task.update_url, "Expires")) - time.time()) + 1.1
        )
        assert time.time() > task.deadline
        status, body = call("PUT", task.update_url, a_delta(latest))
        assert status == 403 and b"expired" in body, body
        assert not await store.exists(task.update_key)


async def test_a_task_gets_a_put_url_whenever_its_update_is_larger_than_the_inline_limit(
    s3server: S3Server,
) -> None:
    """The coordinator counts an update's exact size, int8 scales included: an update one byte over
    the inline limit has a PUT URL for exactly its size; at the limit it travels inline."""
    prefix, job = unique("limit"), unique("job")
    async with store_for(s3server, prefix) as store:
        latest = await job_on_s3(store, job)
        spec = FlatModel.from_bytes(latest.blob).spec
        for scheme, block in (("int8", 256), ("int8", 4), ("none", 256)):
            size = payload_size(spec, scheme, block)
            over = await maker(store, job, inline_limit=size - 1, quant=scheme, block=block).make(
                latest, "cpu", -1, TTL, time.time()
            )
            assert amz(over.update_url, "SignedHeaders") == "content-length;host", scheme
            status, body = call("PUT", over.update_url, a_delta(latest, scheme, block))
            assert status == 200, (scheme, block, body)
            at = await maker(store, job, inline_limit=size, quant=scheme, block=block).make(
                latest, "cpu", -1, TTL, time.time()
            )
            assert at.update_url == "", (scheme, block)


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
