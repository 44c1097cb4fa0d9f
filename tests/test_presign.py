"""Workers without store credentials: a task's presigned URLs reach its model (GET) and its own
update key (PUT, of the update's exact size) until the task's deadline, and nothing else; the
aggregator takes a claim check only at the key the coordinator signed into the task; a worker
with no store at all trains by those URLs; a whole job on S3 runs with workers that hold no store
settings or credentials.

The URLs are tried against the tests' S3 API server (moto, behind ``tests.support.s3gate``, which
checks presigned URLs as S3 does: moto itself does not)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from calendar import timegm
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from structlog.testing import capture_logs

from aggregator.binding import bind
from aggregator.core import Rejected
from broker_config.names import Names
from coordinator.config import CoordinatorConfig
from coordinator.tasks import Latest, TaskMaker
from fedq.audit import audit
from shared.codec import encode
from shared.messages import Update
from shared.quantize import encode_delta, payload_size
from shared.reasons import Reason
from shared.s3 import S3Store
from shared.settings import Settings
from shared.store import Manifest, ModelStore, model_key, update_key
from shared.tensors import FlatModel
from shared.transport.memory import MemoryTransport
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import delete_namespace
from tests.support.jobs import ROOT, TINY_APP, cli, fedq, log_events, records
from tests.support.messages import JOB, OWNER, an_update, make_task, token_of, trust
from tests.support.rigs import aggregator_rig, worker_rig
from tests.support.s3server import S3Server, s3server_fixture  # noqa: F401 - the s3server fixture
from tests.support.tiny import LinearApp
from tests.support.waiting import events
from worker.decision import Decision
from worker.service import worker_store

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


# -- a worker with no store -------------------------------------------------------------------------


def test_store_none_means_no_store(tmp_path: Path) -> None:
    """``--store none`` (or empty): a worker with no store; the default stays the local directory."""
    for spec in ("none", "None", "", " none "):
        assert worker_store(Settings(store=spec)) is None, spec
    local = worker_store(Settings(store=str(tmp_path / "store")))
    assert local is not None and not (tmp_path / "store").exists()  # opened, not touched
    assert worker_store(Settings()) is not None


async def test_a_worker_with_no_store_trains_by_the_tasks_urls(
    s3server: S3Server, mem: MemoryTransport, tmp_path: Path
) -> None:
    """A worker with no store at all takes the model by the task's GET URL and puts its update at
    the task's key by its PUT URL; the update names that key, with the stored bytes' digest."""
    prefix = unique("worker")
    async with store_for(s3server, prefix) as store, worker_rig(mem, tmp_path) as r:
        assert r.worker.store is None
        latest = await job_on_s3(store, mem.names.job)
        task = await maker(store, mem.names.job).make(latest, "cpu", -1, TTL, time.time())
        assert task.model == b"" and task.model_url and task.update_url
        body = encode(task, OWNER)
        await r.send(body)
        assert await r.worker.step(task, await r.take(), token_of(body)) is Decision.TRAIN
        update, _ = await r.next_update()
        stored = await store.get(task.update_key)
        assert update.delta == b"" and update.delta_key == task.update_key
        assert update.delta_size == len(stored) and update.delta_sha256 == hashlib.sha256(stored).hexdigest()
        await r.dead.expect_none()


async def test_a_worker_with_no_store_refuses_a_task_that_needs_one(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    """A task whose model is neither inline nor presigned (the coordinator's store is a directory)
    is dead-lettered by a worker with no store, saying what it lacks; nothing is trained."""
    async with worker_rig(mem, tmp_path) as r:
        task, _ = r.task()
        task = dataclasses.replace(task, model=b"", model_url="")
        body = encode(task, OWNER)
        await r.send(body)
        with capture_logs() as logs:
            await r.worker.step(task, await r.take(), token_of(body))
        await r.dead.expect(body, "bad_model", r.task_queue)
        [event] = events(logs, "model_unavailable")
        assert "--store none" in event["detail"] and task.model_key in event["detail"]
        assert r.app.trained == 0
        await r.updates.expect_none()


# -- a whole job ------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any fedq, AWS or moto setting, able to import the tiny app."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDQ_", "AWS_", "MOTO_"))}
    return {**env, "PYTHONPATH": str(ROOT), "FEDQ_LOG_JSON": "true", "OMP_NUM_THREADS": "1", **extra}


def stop(procs: list[subprocess.Popen[bytes]], grace: float = 20) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_job_on_s3_whose_workers_hold_no_store_settings(
    s3server: S3Server, tmp_path: Path, names: Names, amqp_url: str
) -> None:
    """The coordinator and the aggregator hold the S3 store and its keys; two workers, each in a
    folder of its own, hold nothing of it (one says ``--store none``, the other nothing at all).
    Every model and update travels by presigned URL (``--inline-limit 0``). The job reaches its
    target accuracy and its audit balances; every applied update is at its task's key in the bucket,
    and no worker made a store of its own."""
    out, job, prefix = tmp_path / "job", unique("nostore"), unique("runs")
    keys = out / "keys"
    assert cli("keys", "init", keys).returncode == 0
    store = f"s3://{s3server.bucket}/{prefix}"
    common = {
        "FEDQ_AMQP_URL": amqp_url,
        "FEDQ_NAMESPACE": names.namespace,
        "FEDQ_JOB": job,
        "FEDQ_APP": TINY_APP[1],
    }
    services = clean_env(
        **common, **s3server.env(), FEDQ_STORE=store, FEDQ_KEYS_DIR=str(keys), FEDQ_OUT=str(out)
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = out / "logs"
    logs.mkdir(parents=True)

    def start(name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(fedq(*args), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    homes = []
    try:
        start("aggregator", ["aggregator", "--buffer", "2"], services, tmp_path)
        coordinator = start(
            "coordinator",
            [
                "coordinator",
                "--min-workers",
                "2",
                "--inline-limit",
                "0",
                "--target-accuracy",
                "0.45",
                "--max-seconds",
                "150",
            ],
            services,
            tmp_path,
        )
        for i, store_flag in enumerate(({"FEDQ_STORE": "none"}, {})):
            home = tmp_path / f"worker-{i}"
            (home / "keys").mkdir(parents=True)
            homes.append(home)
            assert cli("keys", "create", f"w{i}", "--keys-dir", home / "keys").returncode == 0
            enrolled = cli(
                "keys",
                "enrol",
                f"w{i}",
                home / "keys" / f"worker-w{i}.pub",
                "--trusted-keys",
                keys / "trusted",
            )
            assert enrolled.returncode == 0, enrolled
            shutil.copytree(keys / "trusted", home / "keys" / "trusted")
            env = clean_env(**common, **store_flag, FEDQ_KEYS_DIR=str(home / "keys"))
            assert (
                not any(k.startswith(("FEDQ_S3_", "AWS_")) for k in env)
                and env.get("FEDQ_STORE", "none") == "none"
            )
            start(f"w{i}", ["worker", "--worker-id", f"w{i}", "--partition", f"{i}/2"], env, home)
        try:
            assert coordinator.wait(200) == 0, (logs / "coordinator.log").read_text()[-3000:]
        finally:
            stop(procs)
        state = json.loads((out / "coordinator.json").read_text())
        assert state["stop_reason"] == "target_accuracy", state
        settings = Settings(
            amqp_url=amqp_url,
            namespace=names.namespace,
            job=job,
            store=store,
            out=str(out),
            s3_endpoint=s3server.endpoint,
            s3_region=s3server.region,
            s3_access_key=s3server.access_key,
            s3_secret_key=s3server.secret_key,
        )
        balance = asyncio.run(audit(settings))
    finally:
        stop(procs)
        asyncio.run(delete_namespace(amqp_url, names, ("cpu",), (job,)))
    assert balance.ok and balance.lost == 0 and balance.applied >= 2, balance.to_dict()
    applied = [r for r in records(out / "ledger.jsonl") if r["fate"] == "applied"]
    assert {r["worker_id"] for r in applied} == {"w0", "w1"}, applied
    client = s3server.client()
    for r in applied:  # each by claim check, at its own task's key
        head = client.head_object(Bucket=s3server.bucket, Key=f"{prefix}/{update_key(job, r['task_id'])}")
        assert head["ContentLength"] > 0
    for i, home in enumerate(homes):
        log = logs / f"w{i}.log"
        assert log_events(log, "update_sent") and not log_events(log, "task_failed"), log.read_text()[-3000:]
        assert not log_events(log, "model_unavailable")
        assert not (home / ".fedq").exists()  # no store of its own: nothing went to the local default
