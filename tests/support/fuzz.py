"""Fuzzing fedq's handlers: messages mutated from real signed ones (many re-signed, so that they
pass the signature check and reach the service's logic), and an exact tally of what became of
every delivery a service received and of every message its dead-letter queue got.

Everything is drawn from one seeded ``random.Random``: the same seed gives the same mutations
(``FEDQ_FUZZ_SEED`` picks it; the tests print it). Keys are drawn from it too (``key``)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker_config.names import REASON_HEADER
from shared.codec import VERSION, signed_bytes
from shared.messages import KINDS
from shared.reasons import Reason
from shared.signing import Signer
from shared.transport import Delivery, Transport
from tests.support.broker import Inbox


def fuzz_seed(default: int) -> int:
    """The seed of this run: ``FEDQ_FUZZ_SEED`` if set, else ``default``; printed (pytest shows it on failure)."""
    seed = int(os.environ.get("FEDQ_FUZZ_SEED", default))
    print(f"fuzz seed {seed} (FEDQ_FUZZ_SEED={seed} reproduces this run)")
    return seed


def key(rng: random.Random) -> Signer:
    """An Ed25519 key drawn from ``rng`` (reproducible, unlike ``Signer.generate``)."""
    return Signer(Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)))


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign_raw(kind: str, head: bytes, payload: bytes, signer: Signer) -> bytes:
    """An envelope of any ``kind`` around any ``head`` and ``payload``, validly signed by ``signer``."""
    fp = signer.fingerprint
    sig = signer.sign(signed_bytes(VERSION, kind, fp, head, payload))
    doc = {"v": VERSION, "kind": kind, "signer": fp, "head": head, "payload": payload, "sig": sig}
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Opened:
    """A real signed message taken apart: its kind, head fields and payload."""

    body: bytes
    kind: str
    fields: dict[str, Any]
    payload: bytes


def opened(body: bytes) -> Opened:
    doc = msgpack.unpackb(body, raw=False)
    return Opened(body, doc["kind"], msgpack.unpackb(doc["head"], raw=False), doc["payload"])


# -- values that do not belong ----------------------------------------------------------------

HUGE_INT = 2**64 - 1  # the largest msgpack integer
WEIRD_INTS = [-1, 0, 1, -(2**63), 2**63 - 1, HUGE_INT, 10**15, -(10**15)]
WEIRD_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0]


def weird_str(rng: random.Random) -> str:
    return rng.choice(
        [
            "",
            "\x00",
            "../../etc/passwd",
            "jobs/job1/updates/",
            "é" * rng.randrange(1, 40),
            "x" * rng.choice([101, 256, 1000, 30_000]),
            "🦀" * 5,
            "job2",
            uuid.uuid4().hex,
            " ",
            "a/b",
        ]
    )


def weird_value(rng: random.Random) -> Any:
    """Any value of any type, many of them out of range."""
    pick = rng.randrange(9)
    if pick == 0:
        return rng.choice(WEIRD_INTS)
    if pick == 1:
        return rng.choice(WEIRD_FLOATS)
    if pick == 2:
        return weird_str(rng)
    if pick == 3:
        return rng.randbytes(rng.choice([0, 1, 32, 64, 500]))
    if pick == 4:
        return rng.choice([True, False, None])
    if pick == 5:
        return [weird_value(rng) for _ in range(rng.randrange(4))]
    if pick == 6:
        return {weird_str(rng): weird_value(rng) for _ in range(rng.randrange(3))}
    if pick == 7:
        return {rng.randrange(5): 1.0}  # a map with integer keys (not a str-keyed field)
    return rng.randint(-1000, 1000)


def like(value: Any, rng: random.Random) -> Any:
    """A value of the same type as ``value``, often out of range (wrong content, right type)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        near = [
            v for v in (value + 1, value - 1, value * 1000) if -(2**63) <= v <= HUGE_INT
        ]  # msgpack's range
        return rng.choice([*WEIRD_INTS, *near, rng.randint(-5, 5)])
    if isinstance(value, float):
        return rng.choice([*WEIRD_FLOATS, value * 1e6, -value, 0.0])
    if isinstance(value, str):
        return weird_str(rng)
    if isinstance(value, bytes):
        if value and rng.random() < 0.5:
            b = bytearray(value)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        return rng.randbytes(rng.choice([0, 1, len(value) // 2, len(value) + 1]))
    if isinstance(value, list):
        if value and rng.random() < 0.5:
            return value[: rng.randrange(len(value))]
        return [*value, *(weird_value(rng) for _ in range(rng.randrange(1, 4)))]
    if isinstance(value, dict):
        out = dict(value)
        out[rng.choice([*out, "extra", "x" * 300])] = weird_value(rng)
        return out
    return weird_value(rng)


# -- the mutator --------------------------------------------------------------------------------


@dataclass
class Mutator:
    """Draws messages mutated from ``seeds`` (real signed messages a service gets) and ``others``
    (real signed messages of other kinds, for swaps).

    - ``bytes``: bit flips, truncations, junk appended, garbage, an exact copy (not re-signed);
    - ``envelope``: one envelope field changed, dropped or added (not re-signed);
    - ``fields``: one to three head fields changed (a value of the same type, often out of
      range, or of another type), dropped, added, taken from a message of another kind, the kind
      itself swapped, or the payload changed; then **re-signed** by a key from ``signers``
      (weighted; ``pick_signer`` may choose instead, e.g. the key enrolled for the message's worker
      id), so that it passes the signature check and reaches the service's logic.

    ``special``: extra field mutations of the service's own (name -> function of the fields and
    the rng giving a new value), e.g. a token of another task."""

    rng: random.Random
    seeds: list[bytes]
    others: list[bytes]
    signers: list[tuple[Signer, float]]
    special: dict[str, Callable[[dict[str, Any], random.Random], Any]] = field(default_factory=dict)
    payloads: list[Callable[[bytes, random.Random], bytes]] = field(default_factory=list)
    pick_signer: Callable[[dict[str, Any], random.Random], Signer | None] = lambda fields, rng: None
    weights: tuple[float, float, float] = (0.25, 0.15, 0.60)  # bytes, envelope, fields
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._seeds = [opened(b) for b in self.seeds]
        self._others = [opened(b) for b in self.others]
        self._keys = [s for s, _ in self.signers]
        self._key_weights = [w for _, w in self.signers]
        self.last_kind = ""

    def opened_kind(self, body: bytes) -> str:
        return opened(body).kind

    def next(self) -> bytes:
        rng = self.rng
        seed = rng.choice(self._seeds)
        self.last_kind = seed.kind  # which kind of message this one was made from
        how = rng.choices(("bytes", "envelope", "fields"), self.weights)[0]
        self.counts[how] += 1
        if how == "bytes":
            return self._bytes(seed.body)
        if how == "envelope":
            return self._envelope(seed)
        return self._fields(seed)

    # -- not re-signed ----------------------------------------------------------------------
    def _bytes(self, body: bytes) -> bytes:
        rng = self.rng
        pick = rng.randrange(6)
        if pick == 0:
            b = bytearray(body)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        if pick == 1:
            return body[: rng.randrange(len(body))]
        if pick == 2:
            return body + rng.randbytes(rng.randint(1, 64))
        if pick == 3:
            return rng.randbytes(rng.randrange(0, 300))
        if pick == 4:
            return msgpack.packb(weird_value(rng), use_bin_type=True)  # type: ignore[no-any-return]
        return body  # an exact copy: a replay

    def _envelope(self, seed: Opened) -> bytes:
        rng = self.rng
        doc = msgpack.unpackb(seed.body, raw=False)
        name = rng.choice(["v", "kind", "signer", "head", "payload", "sig", "drop", "add", "swap"])
        if name == "drop":
            del doc[rng.choice(list(doc))]
        elif name == "add":
            doc[rng.choice(["extra", "v2", "sig2"])] = weird_value(rng)
        elif name == "swap":  # a part of another real message under this one's signature
            other = msgpack.unpackb(rng.choice(self._others + self._seeds).body, raw=False)
            part = rng.choice(["head", "payload", "sig", "signer", "kind"])
            doc[part] = other[part]
        elif name == "kind":
            doc["kind"] = rng.choice([*KINDS, "Update", "", "updates", weird_value(rng)])
        elif name == "signer":
            doc["signer"] = rng.choice([self.rng.choice(self._keys).fingerprint, "0" * 16, weird_value(rng)])
        elif rng.random() < 0.3:
            doc[name] = weird_value(rng)
        else:
            doc[name] = like(doc[name], rng)
        return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]

    # -- re-signed ------------------------------------------------------------------------------
    # the field operations and how often each is drawn
    FIELD_OPS = (
        ("like", 25),  # a value of the same type, often out of range
        ("weird", 10),  # a value of any type
        ("drop", 5),
        ("add", 4),
        ("other_kind", 8),  # a field of another kind's message
        ("kind", 4),  # the kind swapped, the fields kept
        ("special", 30),  # the service's own (``special``)
        ("payload", 9),
        ("same_kind", 5),  # the value of another real message of this kind
    )

    def _fields(self, seed: Opened) -> bytes:
        rng = self.rng
        kind, fields, payload = seed.kind, copy.deepcopy(seed.fields), seed.payload
        ops, weights = zip(*self.FIELD_OPS, strict=True)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            op = rng.choices(ops, weights)[0]
            name = rng.choice(list(fields)) if fields else "x"
            if op == "like" and fields:
                fields[name] = like(fields[name], rng)
            elif op == "weird" and fields:
                fields[name] = weird_value(rng)
            elif op == "drop" and fields:
                del fields[name]
            elif op == "add":
                fields[rng.choice(["extra", "delta", "model", "signature", "v"])] = weird_value(rng)
            elif op == "other_kind":  # under its own name or this one's
                other = rng.choice(self._others)
                if other.fields:
                    theirs = rng.choice(list(other.fields))
                    fields[rng.choice([theirs, name])] = copy.deepcopy(other.fields[theirs])
            elif op == "kind":  # the payload goes along if the new kind has one
                kind = rng.choice([k for k in KINDS if k != kind])
            elif op == "special" and (ours := [f for f in self.special if f in fields]):
                special = rng.choice(ours)  # of the fields this message has
                fields[special] = self.special[special](fields, rng)
            elif op == "payload":
                payload = self._payload(payload)
            elif op == "same_kind" and fields:
                same = [s for s in self._seeds if s.kind == kind and name in s.fields]
                if same:
                    fields[name] = copy.deepcopy(rng.choice(same).fields[name])
        head = msgpack.packb(fields, use_bin_type=True)
        signer = self.pick_signer(fields, rng) or rng.choices(self._keys, self._key_weights)[0]
        if kind not in ("task", "update") and rng.random() < 0.8:
            payload = b""  # mostly keep the "no payload" rule, to get past it
        return sign_raw(kind, head, payload, signer)

    def _payload(self, payload: bytes) -> bytes:
        rng = self.rng
        if self.payloads and rng.random() < 0.5:
            return rng.choice(self.payloads)(payload, rng)
        pick = rng.randrange(5)
        if pick == 0:
            return b""
        if pick == 1 and payload:
            return payload[: rng.randrange(len(payload))]
        if pick == 2 and payload:
            b = bytearray(payload)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        if pick == 3:
            return rng.randbytes(rng.choice([1, 60, 100_000]))
        return payload + rng.randbytes(rng.randint(1, 16))


# -- what became of every message -----------------------------------------------------------------


@dataclass
class Tally:
    """How the watched transports' deliveries were settled, by the digest of their bodies: acked,
    dead-lettered (by reason) or given back (``retry_later``). Installed by patching ``Delivery``'s
    settling methods (the transports' deliveries inherit them), for one test."""

    watched: list[Transport]
    acked: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    given_back: Counter[str] = field(default_factory=Counter)
    examples: dict[str, bytes] = field(default_factory=dict)  # one body per reason

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Tally:
        ack, dead_letter, retry_later = Delivery.ack, Delivery.dead_letter, Delivery.retry_later
        dying: set[int] = set()
        tally = self

        def mine(d: Delivery) -> bool:
            return not d.settled and any(d.transport is t for t in tally.watched)

        async def on_ack(d: Delivery) -> bool:
            if mine(d) and id(d) not in dying:
                tally.acked[digest(d.body)] += 1
            return await ack(d)

        async def on_dead_letter(d: Delivery, reason: str, detail: str = "") -> None:
            if mine(d):
                tally.dead[digest(d.body)] += 1
                tally.reasons[str(reason)] += 1
                tally.examples.setdefault(str(reason), d.body)
                dying.add(id(d))
            try:
                await dead_letter(d, reason, detail)
            finally:
                dying.discard(id(d))

        async def on_retry_later(d: Delivery) -> None:
            if mine(d):
                tally.given_back[digest(d.body)] += 1
            await retry_later(d)

        monkeypatch.setattr(Delivery, "ack", on_ack)
        monkeypatch.setattr(Delivery, "dead_letter", on_dead_letter)
        monkeypatch.setattr(Delivery, "retry_later", on_retry_later)
        return self

    @property
    def settled(self) -> int:
        return sum(self.acked.values()) + sum(self.dead.values())


@dataclass
class DeadLetters:
    """Everything a dead-letter queue gets, acked at once: by digest, with fedq's reason (or the
    broker's, ``x-first-death-reason``, for a message past its delivery limit)."""

    got: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    broker: Counter[str] = field(default_factory=Counter)  # dead-lettered by the broker itself
    _pump: asyncio.Future[None] | None = None

    def note(self, d: Delivery) -> None:
        self.got[digest(d.body)] += 1
        reason = d.headers.get(REASON_HEADER)
        if reason is None:
            self.broker[digest(d.body)] += 1
            reason = f"broker:{d.headers.get('x-first-death-reason')}"
        self.by_reason[str(reason)] += 1

    @classmethod
    async def on(cls, transport: Transport, queue: str) -> DeadLetters:
        """Consuming ``queue`` on ``transport``."""
        dead = cls()

        async def take(d: Delivery) -> None:
            await d.ack()
            dead.note(d)

        await transport.consume(queue, take, prefetch=1000)
        return dead

    @classmethod
    def from_inbox(cls, inbox: Inbox) -> DeadLetters:
        """What an ``Inbox`` (a rig's, on the dead-letter queue) gets, from now on (a task reads it)."""
        dead = cls()

        async def pump() -> None:
            while True:
                dead.note(await inbox.got.get())

        dead._pump = asyncio.ensure_future(pump())
        return dead

    @property
    def count(self) -> int:
        return sum(self.got.values())

    def close(self) -> None:
        """Stop reading the inbox (``from_inbox``)."""
        if self._pump is not None:
            self._pump.cancel()


def check_reasons(reasons: Counter[str]) -> None:
    """Every reason a service gave is one of fedq's, and none says that handling a message raised."""
    known = {r.value for r in Reason}
    assert set(reasons) <= known, f"reasons fedq does not know: {set(reasons) - known}"
    assert Reason.INTERNAL_ERROR not in reasons, f"handling {reasons[Reason.INTERNAL_ERROR]} messages raised"


async def publish_all(send: Callable[[bytes], Any], bodies: list[bytes], batch: int = 200) -> None:
    """Publish ``bodies`` in order, ``batch`` at a time concurrently (each waits for its confirm)."""
    for i in range(0, len(bodies), batch):
        await asyncio.gather(*(send(b) for b in bodies[i : i + batch]))


def elapsed(since: float) -> str:
    return f"{time.monotonic() - since:.1f}s"
