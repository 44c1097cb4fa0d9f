"""The wire format: one versioned msgpack envelope, signed with Ed25519.

    {"v": 1, "kind": str, "signer": str, "head": bytes, "payload": bytes, "sig": bytes}

``head`` is the msgpack of the message's fields (all but the payload). The
signature covers ``["fedq", v, kind, signer, head, sha256(payload)]``, so the
bytes that are verified are the bytes that were sent: nothing is re-encoded.
Decoding is strict: unknown versions, kinds, fields or types are rejected with a
``WireError`` that keeps the raw bytes. A message above the size cap (``max_bytes``,
``--max-message-bytes``) is refused as ``too_large`` before anything in it is unpacked or hashed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from shared.errors import (
    BadSignatureError,
    ConfigError,
    DecodeError,
    TooLargeError,
    UnknownTaskError,
    WireError,
)
from shared.messages import KINDS, LATER_FIELDS, PAYLOAD_FIELD, Message, Task
from shared.signing import Keyring, Signer, authorize

VERSION = 1
ENVELOPE_KEYS = frozenset({"v", "kind", "signer", "head", "payload", "sig"})
MAX_HEAD_BYTES = 64 * 1024

T = TypeVar("T")

# -- limits ------------------------------------------------------------------------------------

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the default of --max-message-bytes (Settings.max_message_bytes)
# The most an envelope adds to its payload: the head (at most MAX_HEAD_BYTES), the signature, the
# signer's fingerprint, the kind and msgpack's framing. A payload of N bytes travels in at most
# N + ENVELOPE_BYTES.
ENVELOPE_BYTES = MAX_HEAD_BYTES + 1024
BROKER_MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # RabbitMQ's ceiling for its own max_message_size
# Unacked deliveries a consumer may hold, in bytes: prefetch x the cap stays under this.
PREFETCH_BUDGET_BYTES = 256 * 1024 * 1024


def check_size(raw: bytes, max_bytes: int) -> None:
    """``TooLargeError`` when ``raw`` is above the cap; only its length is looked at."""
    if len(raw) > max_bytes:
        raise TooLargeError(
            f"a message of {len(raw)} bytes is above the cap of {max_bytes} bytes (--max-message-bytes)", raw
        )


def check_message_cap(max_message_bytes: int, inline_limit: int) -> None:
    """``ConfigError`` unless the cap fits what fedq sends: a task's inline model and an update's
    inline delta are up to ``inline_limit`` bytes, in their envelope (larger ones travel by claim
    check), and RabbitMQ takes nothing above its own ceiling."""
    largest = inline_limit + ENVELOPE_BYTES
    if max_message_bytes < largest:
        raise ConfigError(
            f"--max-message-bytes {max_message_bytes} is below what fedq sends: --inline-limit {inline_limit} "
            f"plus {ENVELOPE_BYTES} bytes of envelope = {largest}; raise the cap or lower --inline-limit"
        )
    if max_message_bytes > BROKER_MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"--max-message-bytes {max_message_bytes} is above {BROKER_MAX_MESSAGE_BYTES}, the most RabbitMQ "
            "accepts (its max_message_size)"
        )


def bounded_prefetch(
    wanted: int, max_message_bytes: int, *, need: int = 1, budget: int = PREFETCH_BUDGET_BYTES
) -> int:
    """The prefetch count to ask for, so that prefetch x ``max_message_bytes`` stays under ``budget``
    bytes of unacked deliveries, but never below ``need`` (what the consumer holds unacked to make
    progress: the aggregator's buffer). RabbitMQ does not implement basic.qos prefetch_size (a
    non-zero value closes the connection with NOT_IMPLEMENTED), so a byte bound is a count bound.
    ``wanted`` 0 (AMQP's "no limit") counts as no wish."""
    fits = max(1, budget // max(1, max_message_bytes))
    return max(need, fits if wanted <= 0 else min(wanted, fits))


@dataclass(frozen=True)
class Envelope:
    v: int
    kind: str
    signer: str
    head: bytes
    payload: bytes
    sig: bytes

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.v, self.kind, self.signer, self.head, self.payload)


def signed_bytes(v: int, kind: str, signer: str, head: bytes, payload: bytes) -> bytes:
    return digest_signed_bytes(v, kind, signer, head, hashlib.sha256(payload).digest())


def digest_signed_bytes(v: int, kind: str, signer: str, head: bytes, payload_sha256: bytes) -> bytes:
    return typing.cast(bytes, msgpack.packb(["fedq", v, kind, signer, head, payload_sha256]))


def kind_of(message: Message) -> str:
    for kind, cls in KINDS.items():
        if type(message) is cls:
            return kind
    raise TypeError(f"{type(message).__name__} is not a fedq message")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        later = LATER_FIELDS.get(type(value), frozenset())
        return {
            f.name: _to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name not in later or getattr(value, f.name) != f.default
        }
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def encode(message: Message, signer: Signer) -> bytes:
    """Sign and serialize a message."""
    kind = kind_of(message)
    signer = signer.current()
    payload_field = PAYLOAD_FIELD.get(kind)
    fields = _to_plain(message)
    payload = fields.pop(payload_field) if payload_field else b""
    head = msgpack.packb(fields, use_bin_type=True)
    fp = signer.fingerprint
    sig = signer.sign(signed_bytes(VERSION, kind, fp, head, payload))
    doc = {"v": VERSION, "kind": kind, "signer": fp, "head": head, "payload": payload, "sig": sig}
    return typing.cast(bytes, msgpack.packb(doc, use_bin_type=True))


def open_envelope(raw: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse the outer envelope without trusting anything in it; ``TooLargeError`` first, when ``raw``
    is above ``max_bytes``."""
    check_size(raw, max_bytes)
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise DecodeError(f"not msgpack: {exc}", raw) from None
    if not isinstance(doc, dict) or set(doc) != ENVELOPE_KEYS:
        raise DecodeError("not a fedq envelope (wrong keys)", raw)
    v, kind, signer, head, payload, sig = (doc[k] for k in ("v", "kind", "signer", "head", "payload", "sig"))
    if v != VERSION or type(v) is not int:
        raise DecodeError(f"unsupported envelope version {v!r}", raw)
    if not isinstance(kind, str) or kind not in KINDS:
        raise DecodeError(f"unknown message kind {kind!r}", raw)
    if not isinstance(signer, str) or not isinstance(sig, bytes) or len(sig) != 64:
        raise DecodeError("malformed signer or signature", raw)
    if not isinstance(head, bytes) or len(head) > MAX_HEAD_BYTES or not isinstance(payload, bytes):
        raise DecodeError("malformed head or payload", raw)
    if kind not in PAYLOAD_FIELD and payload:
        raise DecodeError(f"a {kind} message carries no payload", raw)
    return Envelope(v, kind, signer, head, payload, sig)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float:
        if type(value) in (int, float):
            return float(value)
    elif hint in (int, str, bytes, bool):
        if type(value) is hint:
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _convert(value, option, where)
            except DecodeError:
                continue
    elif origin is tuple and isinstance(value, list):
        (item, _) = typing.get_args(hint)
        return tuple(_convert(v, item, where) for v in value)
    elif origin is dict and isinstance(value, dict):
        key_t, val_t = typing.get_args(hint)
        return {_convert(k, key_t, where): _convert(v, val_t, where) for k, v in value.items()}
    elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _build(hint, value, where)  # type: ignore[arg-type]
    raise DecodeError(f"field {where} has the wrong type ({type(value).__name__})")


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """Type hints and fields of a message class, resolved once (get_type_hints compiles strings)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _build(cls: type[T], fields: dict[str, Any], where: str) -> T:
    hints, known = _schema(cls)  # type: ignore[arg-type]
    unknown = set(fields) - set(known)
    if unknown:
        raise DecodeError(f"{where} has unknown fields {sorted(unknown)}")
    args = {}
    for name, f in known.items():
        if name in fields:
            args[name] = _convert(fields[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DecodeError(f"{where} lacks field {name!r}")
    return cls(**args)


def decode_head(envelope: Envelope, raw: bytes = b"") -> Message:
    """Turn a (verified) envelope into its typed message."""
    try:
        fields = msgpack.unpackb(envelope.head, raw=False, strict_map_key=True)
    except Exception as exc:
        raise DecodeError(f"head is not msgpack: {exc}", raw) from None
    if not isinstance(fields, dict):
        raise DecodeError("head is not a map", raw)
    payload_field = PAYLOAD_FIELD.get(envelope.kind)
    if payload_field:
        if payload_field in fields:
            raise DecodeError(f"{envelope.kind} head must not carry {payload_field!r}", raw)
        fields = {**fields, payload_field: envelope.payload}
    try:
        return typing.cast(Message, _build(KINDS[envelope.kind], fields, envelope.kind))
    except DecodeError as exc:
        raise DecodeError(str(exc), raw) from None
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"invalid {envelope.kind}: {exc}", raw) from None


@typing.overload
def decode(
    raw: bytes, keyring: Keyring, expect: type[T], *, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[T, Envelope]: ...


@typing.overload
def decode(
    raw: bytes,
    keyring: Keyring,
    expect: tuple[type, ...] | None = None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[Message, Envelope]: ...


def decode(
    raw: bytes,
    keyring: Keyring,
    expect: type | tuple[type, ...] | None = None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[Any, Envelope]:
    """Check the size, then parse, verify, decode and check that the signer's role may send it (and,
    for a worker, that it speaks for its own worker id). Raises a ``WireError`` subclass naming the
    reason (``too_large`` above ``max_bytes``, before anything is unpacked or hashed)."""
    envelope = open_envelope(raw, max_bytes)
    peer = keyring.verify(envelope.signer, envelope.sig, envelope.signed_bytes(), raw)
    message = decode_head(envelope, raw)
    if expect is not None and not isinstance(message, expect):
        raise DecodeError(f"unexpected {envelope.kind} message here", raw)
    authorize(envelope.kind, message, peer, raw)
    return message, envelope


# -- task tokens: the coordinator's signed task, carried inside the update that answers it --------
#
# A token is ``[signer, head, sha256(payload), sig]`` of the task's envelope: enough to verify the
# coordinator's signature without the model the task carried. The aggregator believes the task,
# not the worker, about job, incarnation, base version and sample cap, and records the task's
# capability and whether the update came after its deadline.

MAX_TOKEN_BYTES = 8 * 1024


def task_token(envelope: Envelope) -> bytes:
    """The token of a task as it was received (its envelope, verified)."""
    if envelope.kind != "task":
        raise ValueError(f"a token is made from a task, not a {envelope.kind}")
    digest = hashlib.sha256(envelope.payload).digest()
    return typing.cast(bytes, msgpack.packb([envelope.signer, envelope.head, digest, envelope.sig]))


def _token_parts(token: bytes) -> tuple[str, bytes, bytes, bytes]:
    if not token:
        raise UnknownTaskError("the update carries no task token: no issued task is named")
    if len(token) > MAX_TOKEN_BYTES:
        raise UnknownTaskError(f"task token of {len(token)} bytes is too large")
    try:
        parts = msgpack.unpackb(token, raw=False, strict_map_key=True)
    except Exception as exc:
        raise UnknownTaskError(f"task token is not msgpack: {exc}") from None
    if not (
        isinstance(parts, list)
        and len(parts) == 4
        and isinstance(parts[0], str)
        and all(isinstance(p, bytes) for p in parts[1:])
        and len(parts[2]) == 32
        and len(parts[3]) == 64
    ):
        raise UnknownTaskError("task token is malformed")
    return parts[0], parts[1], parts[2], parts[3]


def read_task_token(token: bytes) -> Task:
    """The task a token names, read without checking its signature (for records already checked,
    such as ``fedq replay``'s); ``UnknownTaskError`` if it cannot be read."""
    signer, head, _, sig = _token_parts(token)
    try:
        task = decode_head(Envelope(VERSION, "task", signer, head, b"", sig))
    except WireError as exc:
        raise UnknownTaskError(f"task token: {exc}") from None
    assert isinstance(task, Task)
    return task


def open_task_token(token: bytes, keyring: Keyring) -> Task:
    """The task a token stands for, once the coordinator's signature on it verifies; else
    ``UnknownTaskError`` (nobody this keyring trusts as coordinator issued that task)."""
    signer, head, digest, sig = _token_parts(token)
    try:
        peer = keyring.verify(signer, sig, digest_signed_bytes(VERSION, "task", signer, head, digest))
        task = decode_head(Envelope(VERSION, "task", signer, head, b"", sig))
        authorize("task", task, peer)
    except WireError as exc:
        raise UnknownTaskError(f"the task token does not verify: {exc}") from None
    assert isinstance(task, Task)
    return task


__all__ = [
    "BadSignatureError",
    "Envelope",
    "TooLargeError",
    "bounded_prefetch",
    "check_message_cap",
    "check_size",
    "decode",
    "decode_head",
    "encode",
    "kind_of",
    "open_envelope",
    "open_task_token",
    "task_token",
]
