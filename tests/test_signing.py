"""Ed25519 signing (shared.signing) and key files / trusted-key directories (shared.keys)."""

from __future__ import annotations

import os
import stat
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
    DirectoryKeyring,
    load_or_create_signer,
    load_public_key,
    public_key_path,
    write_public_key,
)
from shared.messages import Receipt
from shared.signing import Keyring, Signer, fingerprint, public_bytes

RECEIPT = Receipt("job", "t-1", "w-1", "applied", "", 3)


# ---------------------------------------------------------------- signing


def test_sign_and_verify() -> None:
    signer = Signer.generate()
    ring = Keyring()
    fp = ring.add(signer.public)
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
    ring = Keyring({signer.fingerprint: signer.public})
    assert stranger.fingerprint not in ring
    with pytest.raises(UnknownSignerError) as info:
        ring.verify(stranger.fingerprint, stranger.sign(b"x"), b"x", raw=b"raw")
    assert info.value.reason == "unknown_signer" and info.value.raw == b"raw"


def test_a_signature_by_another_key_does_not_verify_under_this_fingerprint() -> None:
    a, b = Signer.generate(), Signer.generate()
    ring = Keyring()
    ring.add(a.public)
    ring.add(b.public)
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
    ring.add(first.public)
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


# ---------------------------------------------------------------- trusted-key directories


def test_directory_keyring_trusts_pub_files_and_picks_up_new_ones(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    a, b = Signer.generate(), Signer.generate()
    write_public_key(a.public, trusted / "a.pub")
    (trusted / "notes.txt").write_text("not a key")
    (trusted / "junk.pub").write_text("half-written")  # skipped, never fatal
    ring = DirectoryKeyring(trusted)
    assert len(ring) == 1 and a.fingerprint in ring and b.fingerprint not in ring

    raw_b = codec.encode(RECEIPT, b)
    with pytest.raises(UnknownSignerError):
        codec.decode(raw_b, ring)
    write_public_key(b.public, trusted / "b.pub")  # added after construction
    msg, env = codec.decode(raw_b, ring)  # unknown signer -> refresh -> trusted
    assert msg == RECEIPT and env.signer == b.fingerprint
    assert b.fingerprint in ring and len(ring) == 2

    msg_a, _ = codec.decode(codec.encode(RECEIPT, a), ring)
    assert msg_a == RECEIPT


def test_directory_keyring_on_a_missing_directory(tmp_path: Path) -> None:
    trusted = tmp_path / "later"
    ring = DirectoryKeyring(trusted)
    assert len(ring) == 0
    signer = Signer.generate()
    raw = codec.encode(RECEIPT, signer)
    with pytest.raises(UnknownSignerError):
        codec.decode(raw, ring)
    write_public_key(signer.public, trusted / "s.pub")
    assert codec.decode(raw, ring)[0] == RECEIPT


def test_directory_keyring_still_rejects_bad_signatures(tmp_path: Path) -> None:
    signer = Signer.generate()
    write_public_key(signer.public, tmp_path / "s.pub")
    ring = DirectoryKeyring(tmp_path)
    with pytest.raises(BadSignatureError):
        ring.verify(signer.fingerprint, signer.sign(b"a"), b"b")


def test_signer_key_files_feed_a_directory_keyring(tmp_path: Path) -> None:
    signer = load_or_create_signer(tmp_path / "worker-1.key")
    ring = DirectoryKeyring(tmp_path)  # the .key file is not a .pub and is ignored
    assert len(ring) == 1 and signer.fingerprint in ring
