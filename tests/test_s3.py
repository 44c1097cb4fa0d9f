"""The S3 store against a real S3 API server (moto's, started by the tests on loopback):
round trips, model versions, presigned URLs, clear errors, and one whole job stored on S3."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import torch
from yarl import URL

from broker_config.names import Names
from fedq.cli import _settings, build_parser
from shared.errors import ConfigError, StoreError
from shared.s3 import S3Store
from shared.settings import Settings
from shared.store import LocalStore, Manifest, ModelStore, manifest_key, model_key, open_store
from shared.tensors import FlatModel
from tests.support.broker import delete_namespace
from tests.support.jobs import TINY_APP, finish, records, start_run
from tests.support.private_broker import free_port
from tests.support.s3server import S3Server, s3server_fixture  # noqa: F401 - the s3server fixture


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def store_for(server: S3Server, prefix: str, **overrides: str) -> S3Store:
    args = {
        "endpoint": server.endpoint,
        "region": server.region,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        **overrides,
    }
    return S3Store(f"s3://{server.bucket}/{prefix}", **args)


def raw_keys(server: S3Server, prefix: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", ()))


def model_blob(seed: int) -> bytes:
    torch.manual_seed(seed)
    state = {"w": torch.randn(8, 4), "b": torch.randn(8), "steps": torch.tensor([seed])}
    return FlatModel.from_state_dict(state).to_bytes()


def manifest_for(job: str, version: int, blob: bytes) -> Manifest:
    return Manifest(
        job_id=job,
        version=version,
        parent=version - 1,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        key=model_key(job, version),
        update_ids=(f"task-{version}",),
        created_at=time.time(),
    )


async def test_round_trip(s3server: S3Server) -> None:
    prefix = unique("rt")
    async with store_for(s3server, prefix) as store:
        assert await store.list("") == []
        assert not await store.exists("jobs/a/models/v000001.bin")
        await store.put("jobs/a/models/v000001.bin", b"one")
        await store.put("jobs/a/models/v000002.bin", b"two" * 100_000)
        await store.put("jobs/ab/other.bin", b"neighbour")
        await store.put("top.bin", b"")
        assert await store.get("jobs/a/models/v000001.bin") == b"one"
        assert await store.get("jobs/a/models/v000002.bin") == b"two" * 100_000
        assert await store.get("top.bin") == b""
        assert await store.exists("jobs/a/models/v000001.bin")
        # a prefix is a folder, as in a local store: jobs/a does not list jobs/ab
        assert await store.list("jobs/a") == ["jobs/a/models/v000001.bin", "jobs/a/models/v000002.bin"]
        assert await store.list("jobs/a/models/") == await store.list("jobs/a")
        assert await store.list("") == sorted(
            ["jobs/a/models/v000001.bin", "jobs/a/models/v000002.bin", "jobs/ab/other.bin", "top.bin"]
        )
        await store.put("jobs/a/models/v000001.bin", b"replaced")
        assert await store.get("jobs/a/models/v000001.bin") == b"replaced"
        with pytest.raises(StoreError, match="invalid store key"):
            await store.get("../escape")
    # the keys in the bucket are the local layout under the store's prefix
    assert f"{prefix}/jobs/a/models/v000001.bin" in raw_keys(s3server, prefix + "/")
    assert all(k.startswith(prefix + "/") for k in raw_keys(s3server, prefix))


async def test_many_objects_are_listed_past_one_page(s3server: S3Server) -> None:
    async with store_for(s3server, unique("many")) as store:
        store.list_page = 10  # as S3 does past 1000 keys, at a hundredth of the puts
        keys = [f"k/{i:05d}" for i in range(25)]
        await asyncio.gather(*(store.put(k, b"x") for k in keys))
        assert await store.list("k") == keys


async def test_model_store_on_s3(s3server: S3Server) -> None:
    prefix, job = unique("models"), "job-1"
    async with store_for(s3server, prefix) as objects:
        models = ModelStore(objects, job)
        assert await models.latest() is None and await models.versions() == []
        blobs = {v: model_blob(v) for v in range(3)}
        for v, blob in blobs.items():
            await models.save(manifest_for(job, v, blob), blob)
        assert await models.versions() == [0, 1, 2]
        assert await models.latest() == 2
        assert await models.exists(1) and not await models.exists(3)
        manifest = await models.manifest(1)
        assert manifest.update_ids == ("task-1",) and manifest.sha256 == hashlib.sha256(blobs[1]).hexdigest()
        loaded_manifest, flat = await models.load(2)
        assert loaded_manifest.version == 2 and flat.to_bytes() == blobs[2]
        with pytest.raises(StoreError, match="not in the store"):
            await models.load(7)
    keys = raw_keys(s3server, prefix + "/")
    assert f"{prefix}/{model_key(job, 2)}" in keys and f"{prefix}/{manifest_key(job, 2)}" in keys


async def test_a_changed_model_is_caught_by_its_checksum(s3server: S3Server) -> None:
    prefix, job = unique("tamper"), "job-t"
    async with store_for(s3server, prefix) as objects:
        models = ModelStore(objects, job)
        for v in (0, 1):
            blob = model_blob(v)
            await models.save(manifest_for(job, v, blob), blob)
        # someone rewrites version 1's bytes in the bucket, behind the store's back
        s3server.client().put_object(
            Bucket=s3server.bucket, Key=f"{prefix}/{model_key(job, 1)}", Body=b"evil"
        )
        with pytest.raises(StoreError, match=f"version 1 of job {job} is corrupt"):
            await models.load(1)
        await models.load(0)  # the others are fine


async def test_presigned_urls_work_without_credentials(s3server: S3Server) -> None:
    async with store_for(s3server, unique("presign")) as store:
        await store.put("jobs/j/models/v000003.bin", b"model bytes")
        get_url = await store.presign_get("jobs/j/models/v000003.bin", 300)
        put_url = await store.presign_put("jobs/j/updates/u1.bin", 300)
        assert "X-Amz-Signature=" in get_url and s3server.access_key in get_url
        assert s3server.secret_key not in get_url and s3server.secret_key not in put_url
        async with aiohttp.ClientSession() as http:  # no credentials anywhere
            async with http.get(URL(get_url, encoded=True)) as response:
                assert response.status == 200
                assert await response.read() == b"model bytes"
            async with http.put(URL(put_url, encoded=True), data=b"an update") as response:
                assert response.status == 200, await response.text()
        assert await store.get("jobs/j/updates/u1.bin") == b"an update"
        with pytest.raises(StoreError, match="presigned URL lives"):
            await store.presign_get("jobs/j/models/v000003.bin", 8 * 24 * 3600)


async def test_a_local_store_cannot_presign(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put("a.bin", b"x")
    assert await store.presign_get("a.bin", 60) is None
    assert await store.presign_put("a.bin", 60) is None


async def test_missing_object(s3server: S3Server) -> None:
    async with store_for(s3server, unique("missing")) as store:
        with pytest.raises(StoreError, match=r"'jobs/x/models/v000001\.bin' is not in the store at s3://"):
            await store.get("jobs/x/models/v000001.bin")
        assert not await store.exists("jobs/x/models/v000001.bin")


async def test_wrong_credentials_are_named(s3server: S3Server) -> None:
    """moto checks signatures once told to (reset-auth): the right keys work, wrong ones are named."""
    prefix = unique("auth")
    with s3server.enforce_auth():
        async with store_for(s3server, prefix) as good:
            await good.put("a.bin", b"ok")
            assert await good.get("a.bin") == b"ok"
        async with store_for(s3server, prefix, access_key="AKIANOTAREALKEY00000") as unknown_key:
            with pytest.raises(StoreError, match=r"wrong S3 credentials .*InvalidAccessKeyId"):
                await unknown_key.get("a.bin")
            with pytest.raises(StoreError, match="wrong S3 credentials"):
                await unknown_key.put("b.bin", b"no")
            with pytest.raises(StoreError, match="wrong S3 credentials"):
                await unknown_key.list("")
            with pytest.raises(StoreError, match="wrong S3 credentials"):  # HEAD: a bare 403
                await unknown_key.exists("a.bin")
        async with store_for(s3server, prefix, secret_key="not-the-secret") as wrong_secret:
            with pytest.raises(StoreError, match=r"wrong S3 credentials .*SignatureDoesNotMatch") as err:
                await wrong_secret.get("a.bin")
            assert "not-the-secret" not in str(err.value)


async def test_missing_bucket_and_unreachable_endpoint(s3server: S3Server) -> None:
    missing = S3Store(
        "s3://no-such-bucket-fedq/x",
        endpoint=s3server.endpoint,
        access_key=s3server.access_key,
        secret_key=s3server.secret_key,
    )
    async with missing:
        for call in (missing.get("k"), missing.put("k", b"1"), missing.list("")):
            with pytest.raises(StoreError, match="bucket 'no-such-bucket-fedq' does not exist at http://127"):
                await call
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    nowhere = S3Store(  # one attempt, no retry waits: the same error
        f"s3://{s3server.bucket}/x",
        endpoint=endpoint,
        access_key=s3server.access_key,
        secret_key=s3server.secret_key,
        attempts=1,
    )
    async with nowhere:
        with pytest.raises(StoreError, match=f"S3 endpoint {endpoint} is unreachable"):
            await nowhere.get("k")


async def test_settings_fedq_values_win_over_aws_ones(
    s3server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = unique("settings")
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # botocore's own settings alone are enough
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3server.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3server.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.secret_key)
    from_aws = open_store(f"s3://{s3server.bucket}/{prefix}", Settings())
    assert isinstance(from_aws, S3Store)
    async with from_aws:
        await from_aws.put("a.bin", b"via AWS_*")
    # fedq's settings win: the AWS_* ones now point nowhere and hold a wrong secret
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    for name, value in s3server.env().items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert settings.s3_endpoint == s3server.endpoint and settings.s3_secret_key == s3server.secret_key
    assert s3server.secret_key not in repr(settings)
    from_fedq = open_store(f"s3://{s3server.bucket}/{prefix}", settings)
    assert isinstance(from_fedq, S3Store)
    with s3server.enforce_auth():
        async with from_fedq:
            assert await from_fedq.get("a.bin") == b"via AWS_*"


def test_open_store_specs(tmp_path: Path) -> None:
    store = open_store("s3://bucket/a/b/", Settings(s3_endpoint="http://127.0.0.1:9000"))
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == ("bucket", "a/b")
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    with pytest.raises(StoreError, match="s3://bucket/prefix"):
        open_store("gs://bucket/x")
    with pytest.raises(ConfigError, match="use s3://bucket"):
        open_store("s3:///no-bucket", Settings())
    with pytest.raises(ConfigError, match="set together"):
        open_store("s3://bucket", Settings(s3_access_key="only-the-id"))


def test_a_local_store_does_not_import_aioboto3(tmp_path: Path) -> None:
    code = (
        "import sys; from shared.store import open_store; "
        f"open_store({str(tmp_path)!r}); print('aioboto3' in sys.modules, 'botocore' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["False", "False"]


def test_s3_flags_but_no_key_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["worker", "--s3-endpoint", "http://minio:9000", "--s3-region", "eu-west-1"])
    settings = _settings(args)
    assert (settings.s3_endpoint, settings.s3_region) == ("http://minio:9000", "eu-west-1")
    for command in ("run", "coordinator", "aggregator", "worker"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()  # type: ignore[union-attr]
        assert "--s3-endpoint" in text and "--s3-region" in text, command
        assert "--s3-secret-key" not in text and "--s3-access-key" not in text, command


@pytest.mark.slow
def test_job_stores_its_versions_on_s3(
    s3server: S3Server, tmp_path: Path, names: Names, amqp_url: str
) -> None:
    """A whole job (the tiny app: what is stored matters here, not learning) keeps its versions in
    the bucket: every manifest and model there, the ledger matching the manifests, nothing local."""
    out = tmp_path / unique("s3run")  # the job id is the run folder's name: unique in the shared bucket
    try:
        output = finish(
            start_run(
                out,
                names,
                *TINY_APP,
                "--workers",
                "2",
                "--buffer",
                "2",
                "--store",
                f"s3://{s3server.bucket}/runs",
                "--target-accuracy",
                "0",
                "--max-versions",
                "4",
                "--inline-limit",
                "0",  # tasks carry a store reference: workers fetch every model from S3
                env=s3server.env(),
            ),
            timeout=240,
        )
    finally:
        asyncio.run(delete_namespace(amqp_url, names, ("cpu",), (out.name,)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions", (summary, output[-2000:])
    assert summary["audit"]["lost"] == 0 and not summary["audit"]["applied_twice"], summary["audit"]
    assert not (out / "store").exists()  # nothing went to the local default
    config = json.loads((out / "config.json").read_text())["settings"]
    assert config["store"] == f"s3://{s3server.bucket}/runs"
    assert s3server.secret_key not in (out / "config.json").read_text()

    job = out.name
    keys = raw_keys(s3server, f"runs/jobs/{job}/models/")
    versions = sorted(int(k.rsplit("/v", 1)[1][:-5]) for k in keys if k.endswith(".json"))
    # the chain from 0, up to the version the job stopped at or one more (the aggregator may fold the
    # updates in flight when the coordinator stops, before it is stopped itself)
    assert versions == list(range(len(versions))) and max(versions) >= summary["versions"] >= 4, keys
    assert {f"runs/{model_key(job, v)}" for v in versions} <= set(keys)
    client = s3server.client()
    in_manifests: Counter[str] = Counter()
    for v in versions:
        body = client.get_object(Bucket=s3server.bucket, Key=f"runs/{manifest_key(job, v)}")["Body"].read()
        in_manifests.update(json.loads(body)["update_ids"])
    applied = Counter(r["task_id"] for r in records(out / "ledger.jsonl") if r["fate"] == "applied")
    assert in_manifests == applied and max(applied.values()) == 1
    for log in sorted((out / "logs").glob("*.log")):  # every service let go of its S3 connections
        assert "Unclosed client session" not in log.read_text(), log.name
