"""Plain HTTP for presigned store URLs: a worker without store credentials fetches models and
uploads large updates with them."""

from __future__ import annotations

from shared.errors import StoreError

TIMEOUT_S = 300


def _redact(url: str) -> str:
    return url.split("?", 1)[0]  # the query holds the signature


async def http_get(url: str) -> bytes:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session,
            session.get(url) as response,
        ):
            if response.status != 200:
                raise StoreError(f"GET {_redact(url)} answered {response.status}")
            return await response.read()
    except aiohttp.ClientError as exc:
        raise StoreError(f"GET {_redact(url)} failed: {exc}") from exc


async def http_put(url: str, data: bytes) -> None:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session,
            session.put(url, data=data) as response,
        ):
            if response.status not in (200, 201, 204):
                raise StoreError(f"PUT {_redact(url)} answered {response.status}")
    except aiohttp.ClientError as exc:
        raise StoreError(f"PUT {_redact(url)} failed: {exc}") from exc
