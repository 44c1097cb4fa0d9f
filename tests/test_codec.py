"""The wire format (shared.codec + shared.messages): round trips, strict decoding, tamper detection."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import codec
from shared.errors import BadSignatureError, DecodeError, UnknownSignerError, WireError
from shared.messages import (
    KINDS,
    PAYLOAD_FIELD,
    Hello,
    Message,
    ModelAnnouncement,
    Partial,
    Receipt,
    Receipts,
    Round,
    Task,
    TrainConfig,
    Update,
    Verdict,
)
from shared.signing import Keyring, Role, Signer

SIGNER = Signer.generate()
OTHER = Signer.generate()  # trusted too: used to forge "signed by A, claims B"
STRANGER = Signer.generate()  # never trusted
EVERY_ROLE = tuple(Role)
RING = Keyring()  # both keys may send every kind, for worker "w-1" (test_trust checks the roles)
RING.add(SIGNER.public, *EVERY_ROLE, worker_id="w-1")
RING.add(OTHER.public, *EVERY_ROLE, worker_id="w-1")

REASONS = {
    DecodeError: "undecodable",
    BadSignatureError: "bad_signature",
    UnknownSignerError: "unknown_signer",
}

# ---------------------------------------------------------------- strategies

texts = st.text(max_size=24)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
u64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
floats = st.floats(allow_nan=False)  # NaN != NaN would break the equality check, not the codec
str_tuples = st.lists(texts, max_size=5).map(tuple)

train_configs = st.builds(
    TrainConfig,
    epochs=i64,
    batch_size=i64,
    optimizer=texts,
    lr=floats,
    momentum=floats,
    weight_decay=floats,
)
tasks = st.builds(
    Task,
    task_id=texts,
    job_id=texts,
    capability=texts,
    base_version=u64,
    model_sha256=texts,
    model_key=texts,
    train=train_configs,
    quant=texts,
    block=i64,
    deadline=floats,
    issued_at=floats,
    round=i64,
    model=st.binary(max_size=2048),
)
updates = st.builds(
    Update,
    task_id=texts,
    job_id=texts,
    worker_id=texts,
    base_version=i64,
    num_samples=i64,
    quant=texts,
    block=i64,
    metrics=st.dictionaries(texts, floats, max_size=5),
    sent_at=floats,
    delta=st.binary(max_size=2048),
)
hellos = st.builds(
    Hello,
    worker_id=texts,
    capabilities=str_tuples,
    key_fingerprint=texts,
    state=texts,
    sent_at=floats,
    partition=texts,
    busy=st.booleans(),
)
rounds = st.builds(
    Round, job_id=texts, version=i64, round=i64, size=i64, deadline=floats, close=st.booleans()
)
announcements = st.builds(
    ModelAnnouncement,
    job_id=texts,
    version=i64,
    parent=i64,
    sha256=texts,
    key=texts,
    update_ids=str_tuples,
    created_at=floats,
    mean_staleness=floats,
    updates_total=i64,
)
receipts = st.builds(
    Receipt,
    job_id=texts,
    task_id=texts,
    worker_id=texts,
    fate=texts,
    reason=texts,
    version=i64,
    staleness=i64,
)
receipt_batches = st.builds(Receipts, job_id=texts, receipts=st.lists(receipts, max_size=4).map(tuple))
float_tuples = st.lists(floats, max_size=4).map(tuple)
partials = st.builds(
    Partial,
    job_id=texts,
    partial_id=texts,
    shard=i64,
    version=i64,
    update_ids=str_tuples,
    update_digests=str_tuples,
    worker_ids=str_tuples,
    staleness=st.lists(i64, max_size=4).map(tuple),
    weights=float_tuples,
    norms=float_tuples,
    clips=float_tuples,
    recorded=float_tuples,
    num_samples=st.lists(i64, max_size=4).map(tuple),
    norm_total=floats,
    n_float=i64,
    n_exact=i64,
    sums_sha256=texts,
    created_at=floats,
    sums=st.binary(max_size=64),
)
verdicts = st.builds(
    Verdict,
    job_id=texts,
    partial_id=texts,
    shard=i64,
    fate=texts,
    version=i64,
    reason=texts,
    detail=texts,
    duplicates=str_tuples,
)
STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    Task: tasks,
    Update: updates,
    Hello: hellos,
    Round: rounds,
    ModelAnnouncement: announcements,
    Receipt: receipts,
    Receipts: receipt_batches,
    Partial: partials,
    Verdict: verdicts,
}
any_message = st.one_of(*STRATEGIES.values())

# ---------------------------------------------------------------- fixed samples and helpers


def sample(kind: str) -> Message:
    train = TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=0.01, momentum=0.0, weight_decay=1e-4)
    return {
        "task": Task(
            "t-1", "job", "cpu", 3, "ab" * 32, "models/job/3", train, "int8", 256, 1e9, 1e9 - 5, 2, model=b"M"
        ),
        "update": Update("t-1", "job", "w-1", 3, 100, "int8", 256, {"loss": 0.5}, 1e9, delta=b"\x01\x02\x03"),
        "hello": Hello("w-1", ("cpu", "lowmem"), "0123456789abcdef", "up", 1e9, "0/4", True),
        "round": Round("job", 3, 1, 4, 1e9 + 60, False),
        "model": ModelAnnouncement("job", 4, 3, "cd" * 32, "models/job/4", ("t-1", "t-2"), 1e9, 0.5, 8),
        "receipt": Receipt("job", "t-1", "w-1", "rejected", "stale", 4, 21),
        "receipts": Receipts("job", (Receipt("job", "t-1", "w-1", "buffered", "", 4),)),
        "partial": Partial(
            "job", "p-1", 0, 3, ("t-1",), ("ef" * 32,), ("w-1",), (1,), (100.0,), (2.5,), (1.0,), (2.5,), (100,),
            100.0, 2, 0, "01" * 32, 1e9, sums=b"\x00" * 8,
        ),
        "verdict": Verdict("job", "p-1", 0, "rejected", 4, "duplicate", "1 of its updates", ("t-1",)),
    }[kind]


def fields_of(message: Message) -> dict[str, Any]:
    """The head map exactly as ``encode`` put it on the wire."""
    env = msgpack.unpackb(codec.encode(message, SIGNER), raw=False)
    return dict(msgpack.unpackb(env["head"], raw=False))


def forge(
    kind: Any,
    head: Any,
    payload: Any = b"",
    *,
    v: Any = 1,
    by: Signer = SIGNER,
    signer_field: Any = None,
    sig: Any = None,
    extra: dict[str, Any] | None = None,
    drop: str | None = None,
) -> bytes:
    """A correctly signed envelope around arbitrary contents, so that only the contents are wrong."""
    head_bytes = msgpack.packb(head, use_bin_type=True) if isinstance(head, dict) else head
    fp = by.fingerprint if signer_field is None else signer_field
    if sig is None:
        digest = hashlib.sha256(payload if isinstance(payload, bytes) else b"").digest()
        sig = by.sign(msgpack.packb(["fedq", v, kind, fp, head_bytes, digest]))
    doc = {"v": v, "kind": kind, "signer": fp, "head": head_bytes, "payload": payload, "sig": sig}
    doc.update(extra or {})
    if drop:
        del doc[drop]
    return msgpack.packb(doc, use_bin_type=True)


def expect_wire_error(raw: bytes, cls: type[WireError] = DecodeError, ring: Keyring = RING) -> WireError:
    with pytest.raises(WireError) as info:
        codec.decode(raw, ring)
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert err.raw == raw
    assert err.reason == REASONS[cls]
    return err


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_kind(cls: type, data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[cls])
    raw = codec.encode(message, SIGNER)
    ring = Keyring()  # the signer speaks for whichever worker the drawn message names
    ring.add(SIGNER.public, *EVERY_ROLE, worker_id=getattr(message, "worker_id", ""))
    decoded, envelope = codec.decode(raw, ring)
    assert type(decoded) is cls
    assert decoded == message
    assert envelope.v == codec.VERSION
    assert KINDS[envelope.kind] is cls
    assert envelope.signer == SIGNER.fingerprint
    payload_field = PAYLOAD_FIELD.get(envelope.kind)
    assert envelope.payload == (getattr(message, payload_field) if payload_field else b"")
    # Ed25519 is deterministic and the head is a plain map: re-encoding reproduces the bytes.
    assert codec.encode(decoded, SIGNER) == raw


def test_every_kind_has_a_strategy_and_a_sample() -> None:
    assert set(STRATEGIES) == set(KINDS.values())
    for kind, cls in KINDS.items():
        assert codec.kind_of(sample(kind)) == kind
        assert type(sample(kind)) is cls


def test_kind_of_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        codec.kind_of(TrainConfig())  # type: ignore[arg-type]


def test_payload_travels_outside_the_head() -> None:
    raw = codec.encode(sample("update"), SIGNER)
    env = msgpack.unpackb(raw, raw=False)
    assert env["payload"] == b"\x01\x02\x03"
    assert "delta" not in msgpack.unpackb(env["head"], raw=False)
    assert set(env) == codec.ENVELOPE_KEYS


def test_omitted_fields_with_defaults_decode_to_defaults() -> None:
    head = fields_of(sample("hello"))
    del head["partition"], head["busy"]
    msg, _ = codec.decode(forge("hello", head), RING)
    assert isinstance(msg, Hello)
    assert msg.partition == "" and msg.busy is False


def test_int_on_a_float_field_is_accepted_as_float() -> None:
    head = fields_of(sample("round"))
    head["deadline"] = 7
    msg, _ = codec.decode(forge("round", head), RING)
    assert isinstance(msg, Round)
    assert msg.deadline == 7.0 and type(msg.deadline) is float


def test_expect_filters_kinds() -> None:
    raw = codec.encode(sample("hello"), SIGNER)
    msg, _ = codec.decode(raw, RING, expect=(Round, Hello))
    assert isinstance(msg, Hello)
    with pytest.raises(DecodeError) as info:
        codec.decode(raw, RING, expect=Update)
    assert info.value.raw == raw
    assert "hello" in str(info.value)


# ---------------------------------------------------------------- strict envelope


@pytest.mark.parametrize("v", [0, 2, -1, True, 1.0, "1", None, b"\x01"])
def test_unknown_envelope_version(v: Any) -> None:
    err = expect_wire_error(forge("receipt", fields_of(sample("receipt")), v=v))
    assert "version" in str(err)


@pytest.mark.parametrize("kind", ["bogus", "Update", "", b"update", 1, None])
def test_unknown_kind(kind: Any) -> None:
    err = expect_wire_error(forge(kind, fields_of(sample("receipt"))))
    assert "kind" in str(err)


@pytest.mark.parametrize("key", sorted(codec.ENVELOPE_KEYS))
def test_missing_envelope_key(key: str) -> None:
    expect_wire_error(forge("receipt", fields_of(sample("receipt")), drop=key))


def test_extra_envelope_key() -> None:
    expect_wire_error(forge("receipt", fields_of(sample("receipt")), extra={"x": 1}))


@pytest.mark.parametrize(
    "change",
    [
        {"signer_field": 5},
        {"signer_field": b"0123456789abcdef"},
        {"sig": b"\x00" * 63},
        {"sig": b"\x00" * 65},
        {"sig": "s" * 64},
        {"payload": "text"},
        {"payload": None},
    ],
    ids=repr,
)
def test_malformed_envelope_fields(change: dict[str, Any]) -> None:
    expect_wire_error(forge("update", fields_of(sample("update")), **{"payload": b"", **change}))


def test_head_must_be_bytes_and_bounded() -> None:
    expect_wire_error(forge("receipt", "not bytes"))
    expect_wire_error(forge("receipt", ["a", "list"]))
    expect_wire_error(forge("receipt", None))
    big = sample("receipt")
    big = Receipt(big.job_id, big.task_id, big.worker_id, big.fate, "x" * (codec.MAX_HEAD_BYTES + 1), 0)
    err = expect_wire_error(codec.encode(big, SIGNER))
    assert "head" in str(err)


@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(PAYLOAD_FIELD)))
def test_payload_on_a_kind_without_payload(kind: str) -> None:
    err = expect_wire_error(forge(kind, fields_of(sample(kind)), b"smuggled"))
    assert "payload" in str(err)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"garbage that is not msgpack", b"\x86\xa1v", b"\xff" * 10, b"\x93\x01\x02\x03", b"\x01"],
    ids=repr,
)
def test_non_msgpack_or_non_envelope_bytes(raw: bytes) -> None:
    expect_wire_error(raw)


def test_trailing_bytes_after_a_valid_envelope() -> None:
    expect_wire_error(codec.encode(sample("hello"), SIGNER) + b"\x00")


def test_non_string_map_keys() -> None:
    expect_wire_error(msgpack.packb({1: 2}))


# ---------------------------------------------------------------- strict head


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unknown_head_field(kind: str) -> None:
    head = fields_of(sample(kind))
    head["surprise"] = 1
    err = expect_wire_error(forge(kind, head, getattr(sample(kind), PAYLOAD_FIELD.get(kind, ""), b"")))
    assert "surprise" in str(err)


REQUIRED = {
    "task": ["task_id", "job_id", "capability", "base_version", "model_sha256", "model_key", "train"],
    "update": ["task_id", "job_id", "worker_id", "base_version", "num_samples", "quant", "block"],
    "hello": ["worker_id", "capabilities", "key_fingerprint", "state", "sent_at"],
    "round": ["job_id", "version", "round", "size", "deadline"],
    "model": ["job_id", "version", "parent", "sha256", "key", "update_ids", "created_at"],
    "receipt": ["job_id", "task_id", "worker_id", "fate", "reason", "version"],
}


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, names in REQUIRED.items() for n in names])
def test_missing_required_head_field(kind: str, name: str) -> None:
    head = fields_of(sample(kind))
    del head[name]
    err = expect_wire_error(forge(kind, head, getattr(sample(kind), PAYLOAD_FIELD.get(kind, ""), b"")))
    assert name in str(err)


def test_missing_nested_field() -> None:
    head = fields_of(sample("task"))
    head["train"] = {"epochs": 1, "surprise": 2}
    expect_wire_error(forge("task", head, b"M"))


WRONG_TYPES = [
    ("update", "base_version", "3"),
    ("update", "base_version", True),  # bool is not an int on the wire
    ("update", "base_version", 3.0),
    ("update", "num_samples", None),
    ("update", "metrics", [1.0]),
    ("update", "metrics", {"loss": "low"}),
    ("update", "metrics", {"loss": True}),
    ("update", "sent_at", "now"),
    ("update", "sent_at", False),
    ("update", "quant", b"int8"),
    ("task", "train", 5),
    ("task", "train", {"epochs": "5"}),
    ("task", "deadline", None),
    ("task", "round", 1.5),
    ("hello", "capabilities", "cpu"),
    ("hello", "capabilities", [1, 2]),
    ("hello", "capabilities", {"cpu": 1}),
    ("hello", "busy", 1),
    ("hello", "state", 1),
    ("round", "close", "no"),
    ("round", "size", [4]),
    ("model", "update_ids", None),
    ("model", "update_ids", ["a", 2]),
    ("model", "mean_staleness", "0.5"),
    ("receipt", "fate", b"applied"),
    ("receipt", "staleness", 2.5),
]


@pytest.mark.parametrize(("kind", "name", "value"), WRONG_TYPES, ids=repr)
def test_wrong_field_type(kind: str, name: str, value: Any) -> None:
    head = fields_of(sample(kind))
    head[name] = value
    err = expect_wire_error(forge(kind, head, getattr(sample(kind), PAYLOAD_FIELD.get(kind, ""), b"")))
    assert name in str(err)


@pytest.mark.parametrize("kind", sorted(PAYLOAD_FIELD))
def test_payload_field_must_not_be_in_the_head(kind: str) -> None:
    head = fields_of(sample(kind))
    head[PAYLOAD_FIELD[kind]] = b"sneaky"
    expect_wire_error(forge(kind, head, b"real"))


@pytest.mark.parametrize("head", [b"\xc1", b"", msgpack.packb([1, 2]), msgpack.packb({1: "x"})], ids=repr)
def test_head_not_a_msgpack_map(head: bytes) -> None:
    expect_wire_error(forge("receipt", head))


# ---------------------------------------------------------------- trust


def test_signed_by_an_untrusted_key() -> None:
    raw = codec.encode(sample("update"), STRANGER)
    err = expect_wire_error(raw, UnknownSignerError)
    assert STRANGER.fingerprint in str(err)


def test_claiming_another_trusted_signer() -> None:
    raw = forge(
        "update", fields_of(sample("update")), b"\x01\x02\x03", by=SIGNER, signer_field=OTHER.fingerprint
    )
    expect_wire_error(raw, BadSignatureError)
    # the same bytes claiming the true signer verify
    codec.decode(forge("update", fields_of(sample("update")), b"\x01\x02\x03"), RING)


def test_payload_swapped_between_two_valid_messages() -> None:
    a = msgpack.unpackb(codec.encode(sample("update"), SIGNER), raw=False)
    a["payload"] = b"\x09\x09\x09"
    expect_wire_error(msgpack.packb(a, use_bin_type=True), BadSignatureError)


def test_empty_keyring_trusts_nobody() -> None:
    expect_wire_error(codec.encode(sample("hello"), SIGNER), UnknownSignerError, ring=Keyring())


# ---------------------------------------------------------------- tampering


def assert_tamper_detected(raw: bytes, index: int, mask: int) -> None:
    tampered = bytearray(raw)
    tampered[index] ^= mask
    try:
        result = codec.decode(bytes(tampered), RING)
    except WireError as exc:
        assert exc.raw == bytes(tampered)
        assert exc.reason in {"undecodable", "bad_signature", "unknown_signer"}
        return
    raise AssertionError(f"byte {index} ^ {mask:#04x} went unnoticed: {result!r}")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=any_message, data=st.data())
def test_any_single_byte_flip_is_rejected(message: Message, data: st.DataObject) -> None:
    raw = codec.encode(message, SIGNER)
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    assert_tamper_detected(raw, index, mask)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_single_bit_flip_is_rejected(kind: str) -> None:
    """Exhaustive over every bit of one encoded message per kind (a few thousand decodes)."""
    raw = codec.encode(sample(kind), SIGNER)
    for index in range(len(raw)):
        for bit in range(8):
            assert_tamper_detected(raw, index, 1 << bit)
