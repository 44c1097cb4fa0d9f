"""moto's S3 server with presigned URLs checked as S3 checks them: ``python -m tests.support.s3gate``.

moto does not check a presigned URL at all: with its auth off it serves any URL, whatever its
signature, method, key or age, and with its auth on it fails on one (HTTP 500: it looks only for
an Authorization header). In front of moto's own WSGI app, this checks SigV4 query
authentication as S3 documents it, before moto sees the request:

- the signature over the method, the path, every query parameter and the signed headers, with
  the secret of the access key it names (an IAM user of moto's);
- every signed header present, and every ``x-amz-*`` header signed;
- the URL not expired, and not living longer than seven days.

A request refused gets S3's XML error with HTTP 403. A request signed in its Authorization
header, and moto's own API, go through to moto unchanged (moto checks those while its auth is
enforced); a request with no signature at all is refused, as a private bucket refuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import time
from calendar import timegm
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_EXPIRES = 7 * 24 * 3600
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")


def _query(raw: str) -> list[tuple[str, str]]:
    """The query's parameters, decoded, in their order."""
    pairs = []
    for part in raw.split("&") if raw else []:
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def _header(environ: dict[str, Any], name: str) -> str | None:
    key = name.upper().replace("-", "_")
    value = environ.get(key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else f"HTTP_{key}")
    return None if value is None else " ".join(str(value).split())


def _signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def check_presigned(environ: dict[str, Any], secret_of: Callable[[str], str | None], now: float) -> None:
    """Raise ``Refused`` unless the request's query authentication holds, as S3 would say it."""
    raw_uri = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "")
    path, _, raw_query = raw_uri.partition("?")
    params = _query(raw_query)
    values = dict(params)
    wanted = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders")
    if any(name not in values for name in wanted) or values["X-Amz-Algorithm"] != ALGORITHM:
        raise Refused(
            "AuthorizationQueryParametersError",
            "Query-string authentication requires all of " + ", ".join(wanted),
        )
    access_key, _, scope = values["X-Amz-Credential"].partition("/")
    day, region, service, terminator = ([*scope.split("/"), "", "", "", ""])[:4]
    stamp = values["X-Amz-Date"]
    if terminator != "aws4_request" or day != stamp[:8]:
        raise Refused("AuthorizationQueryParametersError", f"bad credential scope {scope!r}")
    secret = secret_of(access_key)
    if secret is None:
        raise Refused(
            "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
        )
    try:
        signed_at = timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
        expires = int(values["X-Amz-Expires"])
    except ValueError:
        raise Refused(
            "AuthorizationQueryParametersError", "X-Amz-Date or X-Amz-Expires is malformed"
        ) from None
    if not 1 <= expires <= MAX_EXPIRES:
        raise Refused("AuthorizationQueryParametersError", "X-Amz-Expires must be 1 to 604800 seconds")
    if now > signed_at + expires:
        raise Refused("AccessDenied", "Request has expired")
    signed = values["X-Amz-SignedHeaders"].split(";")
    present = {k[5:].lower().replace("_", "-") for k in environ if k.startswith("HTTP_X_AMZ_")}
    if present - set(signed):
        raise Refused("AccessDenied", "There were headers present in the request which were not signed")
    canonical_headers = ""
    for name in signed:
        value = _header(environ, name)
        if value is None:
            raise Refused("AccessDenied", f"signed header {name!r} is missing from the request")
        canonical_headers += f"{name}:{value}\n"
    query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(params) if k != "X-Amz-Signature")
    canonical_path = "/".join(_encode(unquote(segment)) for segment in path.split("/"))
    request = "\n".join(
        (
            str(environ["REQUEST_METHOD"]),
            canonical_path,
            query,
            canonical_headers,
            ";".join(signed),
            "UNSIGNED-PAYLOAD",
        )
    )
    to_sign = "\n".join((ALGORITHM, stamp, scope, hashlib.sha256(request.encode()).hexdigest()))
    expected = hmac.new(
        _signing_key(secret, day, region, service), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, values.get("X-Amz-Signature", "")):
        raise Refused(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )


class PresignedGate:
    """WSGI: requests authenticated by their query go to ``app`` only if ``check_presigned`` holds."""

    def __init__(self, app: WsgiApp, secret_of: Callable[[str], str | None]) -> None:
        self.app = app
        self.secret_of = secret_of

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = str(environ.get("QUERY_STRING", ""))
        try:
            if "X-Amz-Signature=" in query or "X-Amz-Credential=" in query:
                check_presigned(environ, self.secret_of, time.time())
            elif "HTTP_AUTHORIZATION" not in environ and not str(environ.get("PATH_INFO", "")).startswith(
                "/moto-api"
            ):
                raise Refused("AccessDenied", "Access Denied")
        except Refused as refused:
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{refused.code}</Code><Message>{escape(refused.message)}</Message></Error>"
            ).encode()
            start_response(
                "403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return self.app(environ, start_response)


def moto_secret(access_key: str) -> str | None:
    """The secret of an access key of one of moto's IAM users (in this process's moto)."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    for user in iam_backends[DEFAULT_ACCOUNT_ID]["aws"].users.values():
        for key in user.access_keys:
            if key.access_key_id == access_key:
                return str(key.secret_access_key)
    return None


def main() -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))  # as moto.server sets it
    app = PresignedGate(DomainDispatcherApplication(create_backend_app), moto_secret)
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
