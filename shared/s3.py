"""The object store on S3 or any S3-compatible server (MinIO, Ceph, R2), through aioboto3.

``s3://bucket/prefix`` holds the same keys as a local store directory
(``jobs/<job>/models/v000012.bin``, ...) under ``prefix``. Endpoint, region and
credentials come from fedq's settings when given (``FEDQ_S3_*``), else botocore
finds them itself (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
Addressing is path-style, which every S3-compatible server accepts. Every failure
becomes a ``StoreError`` that says what went wrong and where.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from shared.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from shared.settings import Settings

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the SigV4 limit
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
    }
)
VERBS = {"put": "write", "get": "read", "list": "list", "exists": "look up", "presign": "presign"}
CREDENTIALS_HINT = (
    "set FEDQ_S3_ACCESS_KEY and FEDQ_S3_SECRET_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"bad S3 store {url!r}: use s3://bucket or s3://bucket/prefix")
    prefix = parts.path.strip("/")
    if ".." in prefix.split("/") or "//" in prefix:
        raise ConfigError(f"bad S3 store {url!r}: the prefix must be a plain path")
    return parts.netloc, prefix


class S3Store:
    """Objects in one bucket under one prefix. One aioboto3 session per store and one client,
    created on first use and reused; ``close()`` releases its connections."""

    list_page = 1000  # keys per listing request (S3's own maximum); a test may list in smaller pages

    def __init__(
        self,
        url: str,
        *,
        endpoint: str = "",
        region: str = "",
        access_key: str = "",
        secret_key: str = "",
        attempts: int = 3,
    ) -> None:
        """``attempts``: tries per request, the first included (botocore's standard retry mode)."""
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        if bool(access_key) != bool(secret_key):
            raise ConfigError("FEDQ_S3_ACCESS_KEY and FEDQ_S3_SECRET_KEY must be set together")
        self._endpoint = endpoint or None  # None: botocore reads AWS_ENDPOINT_URL or uses AWS itself
        # Empty values are left out so that botocore's own chain (AWS_* variables, profiles) applies.
        self._session = aioboto3.Session(
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            region_name=region or None,
        )
        self._config = AioConfig(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            # botocore >= 1.36 adds CRC checksums that older MinIO, Ceph and R2 reject; we send
            # Content-MD5 instead, which every S3-compatible server checks.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = None
        self._holder: AsyncGenerator[Any, None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None

    @classmethod
    def from_settings(cls, url: str, settings: Settings) -> S3Store:
        return cls(
            url,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint})"

    @property
    def endpoint(self) -> str:
        """The endpoint in use (known for sure once the client exists)."""
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return self._endpoint or "the default AWS endpoint"

    # The client ------------------------------------------------------------
    async def _s3(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or used again under a new event loop (a second asyncio.run): a client
            # belongs to the loop it was made in, so this loop gets its own.
            self._loop, self._lock, self._client, self._holder = loop, asyncio.Lock(), None, None
        assert self._lock is not None
        async with self._lock:
            if self._client is None:
                holder = self._hold_client()
                try:
                    client = await anext(holder)
                except ValueError as exc:  # botocore: "Invalid endpoint: ..."
                    raise ConfigError(f"bad S3 endpoint {self._endpoint!r}: {exc}") from None
                except BotoCoreError as exc:
                    self._fail(exc, "", "connect")
                self._client, self._holder = client, holder
        return self._client

    async def _hold_client(self) -> AsyncGenerator[Any, None]:
        """The client lives in this generator: ``close()`` ends it, and so does the event loop's
        shutdown (``asyncio.run`` closes every open async generator), so that a service that never
        calls ``close()`` still releases its connections instead of leaking an aiohttp session."""
        async with self._session.client("s3", endpoint_url=self._endpoint, config=self._config) as client:
            yield client

    async def close(self) -> None:
        holder, self._holder, self._client = self._holder, None, None
        if holder is not None and self._loop is asyncio.get_running_loop():
            await holder.aclose()

    async def __aenter__(self) -> S3Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Keys ------------------------------------------------------------------
    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid store key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key else self.url

    # ObjectStore -----------------------------------------------------------
    async def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()  # transfer check, not security
        s3 = await self._s3()
        try:
            await s3.put_object(Bucket=self.bucket, Key=full, Body=data, ContentMD5=md5)
        except (BotoCoreError, ClientError, aiohttp.ClientError, TimeoutError) as exc:
            self._fail(exc, key, "put")

    async def get(self, key: str) -> bytes:
        full = self._key(key)
        s3 = await self._s3()
        try:
            response = await s3.get_object(Bucket=self.bucket, Key=full)
            async with response["Body"] as body:
                data: bytes = await body.read()
        except (BotoCoreError, ClientError, aiohttp.ClientError, TimeoutError) as exc:
            self._fail(exc, key, "get")
        return data

    async def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix``, taken as a folder (as in a local store), without the store's prefix."""
        sub = prefix.strip("/")
        if sub:
            self._key(sub)  # validates
        base = "/".join(p for p in (self.prefix, sub) if p)
        base = base + "/" if base else ""
        s3 = await self._s3()
        keys: list[str] = []
        try:
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, PaginationConfig={"PageSize": self.list_page}
            )
            async for page in pages:
                keys.extend(obj["Key"] for obj in page.get("Contents", ()))
        except (BotoCoreError, ClientError, aiohttp.ClientError, TimeoutError) as exc:
            self._fail(exc, prefix, "list")
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in keys)

    async def exists(self, key: str) -> bool:
        full = self._key(key)
        s3 = await self._s3()
        try:
            await s3.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _status(exc) == 404:  # also for a missing bucket: HEAD has no body to tell them apart
                return False
            self._fail(exc, key, "exists")
        except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            self._fail(exc, key, "exists")
        return True

    # Presigned URLs: anyone holding one may GET (or PUT) that one object until it expires ---
    async def presign_get(self, key: str, expires_s: int) -> str:
        return await self._presign("get_object", key, expires_s)

    async def presign_put(self, key: str, expires_s: int, size: int | None = None) -> str:
        """``size``: the only length the PUT may have (its Content-Length is signed), so the URL
        cannot store more than that at its key."""
        return await self._presign(
            "put_object", key, expires_s, {} if size is None else {"ContentLength": size}
        )

    async def _presign(
        self, method: str, key: str, expires_s: int, extra: dict[str, Any] | None = None
    ) -> str:
        if not 1 <= expires_s <= MAX_PRESIGN_SECONDS:
            raise StoreError(f"a presigned URL lives 1 to {MAX_PRESIGN_SECONDS} s, not {expires_s}")
        full = self._key(key)
        s3 = await self._s3()
        try:
            url: str = await s3.generate_presigned_url(
                method, Params={"Bucket": self.bucket, "Key": full, **(extra or {})}, ExpiresIn=int(expires_s)
            )
        except (BotoCoreError, ClientError) as exc:
            self._fail(exc, key, "presign")
        return url

    # Errors ----------------------------------------------------------------
    def _fail(self, exc: BaseException, key: str, op: str) -> NoReturn:
        raise self._error(exc, key, op) from exc

    def _error(self, exc: BaseException, key: str, op: str) -> StoreError:
        where = self._where(key)
        at = f"at {self.endpoint}"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = str(error.get("Message", "")) or code
            status = _status(exc)
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist {at} (store {self.url})")
            if code in ("NoSuchKey", "404") or (status == 404 and op in ("get", "exists")):
                return StoreError(f"{key!r} is not in the store at {self.url} ({at})")
            if code in CREDENTIAL_CODES:
                return StoreError(
                    f"wrong S3 credentials for {where} {at}: {code}: {message}; {CREDENTIALS_HINT}"
                )
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                verb = VERBS.get(op, op)
                return StoreError(
                    f"access to {where} denied {at} ({code}): wrong S3 credentials, or they may not {verb} it"
                )
            return StoreError(f"S3 {op} of {where} failed {at}: {code}: {message}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreError(f"no S3 credentials for {self.url}: {CREDENTIALS_HINT}")
        if isinstance(exc, BotoConnectionError | ConnectionClosedError | aiohttp.ClientError):
            return StoreError(f"S3 endpoint {self.endpoint} is unreachable ({op} of {where}): {exc}")
        if isinstance(exc, ReadTimeoutError | TimeoutError):
            return StoreError(f"S3 endpoint {self.endpoint} timed out ({op} of {where})")
        if isinstance(exc, ParamValidationError):
            return StoreError(f"invalid S3 request for {where}: {exc}")
        return StoreError(f"S3 {op} of {where} failed {at}: {exc}")


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
