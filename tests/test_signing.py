"""Ed25519 signing (shared.signing) and key files / trusted-key directories (shared.keys)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from shared import codec
from shared.errors import BadSignatureError, ConfigError, UnknownSignerError
from shared.keys import (
    REVOKED,
    DirectoryTrust,
    key_file_signer,
    load_or_create_signer,
    load_public_key,
    public_key_path,
    write_private_key,
    write_public_key,
)
from shared.messages import Receipt
from shared.signing import Keyring, Role, Signer, fingerprint, public_bytes

RECEIPT = Receipt("job", "t-1", "w-1", "applied", "", 3)


# ---------------------------------------------------------------- signing


def test_sign_and_verify() -> None:
    signer = Signer.generate()
    ring = Keyring()
    fp = ring.add(signer.public, Role.WORKER, worker_id="w-1")
    assert fp == signer.fingerprint
    assert fp in ring and len(ring) == 1
    sig = signer.sign(b"data")
    assert len(sig) == 64
    ring.verify(fp, sig, b"data")  # no exception
    with pytest.raises(BadSignatureError) as info:
        ring.verify(fp, sig, b"datA", raw=b"the raw bytes")
    assert info.value.reason == "bad_signature" and info.value.raw == b"the raw bytes"
    with pytest.raises(BadSignatureError):
        ring.verify(fp, bytes(64), b"data")


def test_unknown_signer() -> None:
    signer, stranger = Signer.generate(), Signer.generate()
    ring = Keyring()
    ring.add(signer.public, Role.COORDINATOR)
    assert stranger.fingerprint not in ring
    with pytest.raises(UnknownSignerError) as info:
        ring.verify(stranger.fingerprint, stranger.sign(b"x"), b"x", raw=b"raw")
    assert info.value.reason == "unknown_signer" and info.value.raw == b"raw"


def test_a_signature_by_another_key_does_not_verify_under_this_fingerprint() -> None:
    a, b = Signer.generate(), Signer.generate()
    ring = Keyring()
    ring.add(a.public, Role.WORKER, worker_id="a")
    ring.add(b.public, Role.WORKER, worker_id="b")
    with pytest.raises(BadSignatureError):
        ring.verify(a.fingerprint, b.sign(b"x"), b"x")


def test_fingerprint_is_16_hex_digits_of_sha256_and_stable() -> None:
    import hashlib

    signer = Signer.generate()
    fp = fingerprint(signer.public)
    assert fp == signer.fingerprint == fingerprint(signer.private.public_key())
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == hashlib.sha256(public_bytes(signer.public)).hexdigest()[:16]
    assert len(public_bytes(signer.public)) == 32
    assert Signer.generate().fingerprint != fp


# ---------------------------------------------------------------- key files


def test_key_file_created_on_first_start(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "nested" / "worker.key"
    signer = load_or_create_signer(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pub = tmp_path / "keys" / "nested" / "worker.pub"
    assert public_key_path(path) == pub
    assert pub.is_file()
    assert fingerprint(load_public_key(pub)) == signer.fingerprint
    assert not list(path.parent.glob("*.tmp"))  # written atomically, nothing left behind


def test_key_file_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "open.key"
        load_or_create_signer(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_loading_again_gives_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.key"
    first = load_or_create_signer(path)
    pem = path.read_bytes()
    second = load_or_create_signer(path)
    assert second.fingerprint == first.fingerprint
    assert path.read_bytes() == pem  # not regenerated
    # a signature by one verifies under the other
    ring = Keyring()
    ring.add(first.public, Role.AGGREGATOR)
    ring.verify(second.fingerprint, second.sign(b"m"), b"m")


def test_missing_public_key_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "w.key"
    signer = load_or_create_signer(path)
    public_key_path(path).unlink()
    assert load_or_create_signer(path).fingerprint == signer.fingerprint
    assert fingerprint(load_public_key(public_key_path(path))) == signer.fingerprint


def _pem_private(key: object, encryption: object = None) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption or NoEncryption())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
        _pem_private(Ed25519PrivateKey.generate())[:60],
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        _pem_private(ec.generate_private_key(ec.SECP256R1())),
        Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        _pem_private(Ed25519PrivateKey.generate(), BestAvailableEncryption(b"secret")),
    ],
    ids=["empty", "garbage", "bad-base64", "truncated", "public-key", "ec-key", "raw-bytes", "encrypted"],
)
def test_corrupt_or_foreign_key_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_or_create_signer(path)
    assert path.read_bytes() == content  # never overwritten


@pytest.mark.parametrize("content", [b"", b"junk", None], ids=["empty", "junk", "missing"])
def test_bad_public_key_file_is_a_config_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.pub"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_public_key(path)


def test_public_key_of_another_algorithm_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "ec.pub"
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError):
        load_public_key(path)


# ---------------------------------------------------------------- the trust directory


def test_a_trust_directory_trusts_each_key_in_its_role_and_a_worker_for_its_id(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    coord, agg, worker = Signer.generate(), Signer.generate(), Signer.generate()
    write_public_key(coord.public, trusted / "coordinator" / "c.pub")
    write_public_key(agg.public, trusted / "aggregator" / "a.pub")
    write_public_key(worker.public, trusted / "workers" / "w-1.pub")
    (trusted / "workers" / "notes.txt").write_text("not a key")
    (trusted / "workers" / "junk.pub").write_text("half-written")  # skipped, never fatal
    ring = DirectoryTrust(trusted)
    assert {(tuple(sorted(p.roles)), p.worker_id) for p in ring.peers()} == {
        (("coordinator",), ""),
        (("aggregator",), ""),
        (("worker",), "w-1"),
    }
    assert any("junk.pub" in problem for problem in ring.skipped)
    assert ring.verify(agg.fingerprint, agg.sign(b"m"), b"m").roles == {Role.AGGREGATOR}


def test_loose_keys_in_the_old_flat_layout_are_not_trusted_and_said_so(tmp_path: Path) -> None:
    signer = Signer.generate()
    write_public_key(signer.public, tmp_path / "coordinator.pub")
    ring = DirectoryTrust(tmp_path)
    assert len(ring) == 0
    assert any("outside a role folder" in problem for problem in ring.missing(Role.COORDINATOR))
    assert any("no coordinator key is trusted" in problem for problem in ring.missing(Role.COORDINATOR))


def test_the_trust_set_is_rebuilt_so_a_removed_or_revoked_key_stops_being_trusted(tmp_path: Path) -> None:
    a, b = Signer.generate(), Signer.generate()
    write_public_key(a.public, tmp_path / "workers" / "a.pub")
    write_public_key(b.public, tmp_path / "workers" / "b.pub")
    ring = DirectoryTrust(tmp_path, reload_seconds=0.0)
    raw_a, raw_b = codec.encode(Receipt("job", "t", "a", "applied", "", 1), a), b.sign(b"x")
    assert a.fingerprint in ring and b.fingerprint in ring
    (tmp_path / "workers" / "a.pub").unlink()  # removed
    (tmp_path / REVOKED).write_text(f"{b.fingerprint}  # lost laptop\n")  # revoked, file still there
    with pytest.raises(UnknownSignerError):
        codec.decode(raw_a, ring)
    with pytest.raises(UnknownSignerError):
        ring.verify(b.fingerprint, raw_b, b"x")
    assert len(ring) == 0


def test_the_directory_is_read_at_a_bounded_rate_whatever_knocks(tmp_path: Path) -> None:
    ring = DirectoryTrust(tmp_path, reload_seconds=60.0)
    late = Signer.generate()
    write_public_key(late.public, tmp_path / "aggregator" / "late.pub")
    for _ in range(1000):  # a flood of unknown signers does not make it read the directory again
        with pytest.raises(UnknownSignerError):
            ring.verify(late.fingerprint, late.sign(b"m"), b"m")
    ring.reload()
    ring.verify(late.fingerprint, late.sign(b"m"), b"m")


def test_one_key_one_role(tmp_path: Path) -> None:
    signer = Signer.generate()
    write_public_key(signer.public, tmp_path / "coordinator" / "c.pub")
    write_public_key(signer.public, tmp_path / "workers" / "w.pub")
    ring = DirectoryTrust(tmp_path)
    assert [sorted(p.roles) for p in ring.peers()] == [["coordinator"]]
    assert any("one key, one role" in problem for problem in ring.skipped)


def test_a_key_file_signer_follows_a_rotated_key_file(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.key"
    signer = key_file_signer(path)
    first = signer.current().fingerprint
    rotated = Signer.generate()
    time.sleep(0.01)
    write_private_key(rotated, path)
    signer._box["checked"] = -1e9  # as if a second had passed
    assert signer.current().fingerprint == rotated.fingerprint != first
    raw = codec.encode(RECEIPT, signer)
    assert codec.open_envelope(raw).signer == rotated.fingerprint
