"""A real S3 API server for the tests: moto's server on loopback, started per session.

The server gets an IAM user with a policy that allows everything, and a bucket. Its
credentials are the ones the tests use, so that ``enforce_auth()`` can switch signature
checking on (moto checks nothing by default) and wrong credentials are refused while the
right ones still work. moto never checks a presigned URL: ``tests.support.s3gate`` runs it
behind a check of every presigned URL as S3 makes it (signature, signed headers, expiry), and
refuses requests with no signature at all. A missing moto is a loud failure, never a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.private_broker import free_port

REGION = "us-east-1"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION

    def env(self) -> dict[str, str]:
        """Variables for a process that should use this server through fedq's own settings."""
        return {
            "FEDQ_S3_ENDPOINT": self.endpoint,
            "FEDQ_S3_REGION": self.region,
            "FEDQ_S3_ACCESS_KEY": self.access_key,
            "FEDQ_S3_SECRET_KEY": self.secret_key,
        }

    def client(self, **overrides: str) -> Any:
        """A plain (synchronous) boto3 client, to look at or tamper with the bucket behind fedq's back."""
        import boto3
        from botocore.config import Config

        args = {
            "endpoint_url": self.endpoint,
            "region_name": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            **overrides,
        }
        return boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **args)

    def _moto_api(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/{path}",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain"},  # moto reads the raw body, not a form
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    @contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """Check signatures and credentials on every request in the block (moto's reset-auth).

        Off outside the block: moto fails on a presigned URL while it is on (it answers 500);
        presigned URLs are checked in front of moto, on or off (``tests.support.s3gate``)."""
        self._moto_api("reset-auth", b"0")
        try:
            yield
        finally:
            self._moto_api("reset-auth", b"inf")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def moto_server(log_dir: Path, bucket: str = "fedq-test", timeout: float = 30.0) -> Iterator[S3Server]:
    """Start moto's server (behind ``tests.support.s3gate``) on 127.0.0.1, wait for it, set it up,
    and kill it at the end."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.fail(
            "moto's S3 server is not installed: .venv/bin/pip install 'moto[server]' (it is in the dev extra)",
            pytrace=False,
        )
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = log_dir / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FEDQ_S3_", "MOTO_"))}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.s3gate", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,  # where ``tests.support`` imports from
        )
    try:
        deadline = time.monotonic() + timeout
        while not _answers(f"{endpoint}/moto-api/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                what = f"exited with code {proc.returncode}" if proc.poll() is not None else "did not answer"
                pytest.fail(
                    f"moto_server on {endpoint} {what} within {timeout:.0f}s:\n{log_path.read_text()[-3000:]}",
                    pytrace=False,
                )
            time.sleep(0.1)
        yield _set_up(endpoint, bucket)
    finally:
        proc.kill()
        proc.wait(10)


def _set_up(endpoint: str, bucket: str) -> S3Server:
    """An IAM user allowed everything (its keys work when auth is enforced) and the bucket."""
    import boto3

    admin = {
        "endpoint_url": endpoint,
        "region_name": REGION,
        "aws_access_key_id": "moto-setup",  # anything goes while moto does not check
        "aws_secret_access_key": "moto-setup",
    }
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="fedq")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="fedq", PolicyName="everything", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="fedq")["AccessKey"]
    server = S3Server(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"])
    server.client().create_bucket(Bucket=bucket)
    return server


@pytest.fixture(scope="session", name="s3server")
def s3server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``s3server``: one moto server for the session; tests that write use prefixes of their own.
    A test module imports ``s3server_fixture`` to use it."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server
