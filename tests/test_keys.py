"""``fedq keys`` (fedq/keys.py): the trust directory an operator lays out, enrolment, revocation and
rotation, and ``fedq run``'s keys made the same way. No broker: files only."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedq.cli import main
from fedq.keys import enrol, init, listing, revoke, rotate
from fedq.run import prepare_keys
from shared.errors import ConfigError
from shared.keys import (
    RELOAD_SECONDS,
    DirectoryTrust,
    key_file_signer,
    load_or_create_signer,
    load_public_key,
    read_revoked,
    write_public_key,
)
from shared.signing import Peer, Role, Signer


@pytest.fixture(autouse=True)
def _no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main`` configures structlog to print to the stderr of the moment: here, pytest's capture,
    closed after the test, which later tests would then log to."""
    monkeypatch.setattr("fedq.cli.configure_logging", lambda *args: None)


def fedq_keys(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``fedq keys ARGS`` in this process: exit code, stdout, stderr."""
    code = main(["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


def roles(trusted: Path) -> dict[str, Peer]:
    trust = DirectoryTrust(trusted)
    assert trust.skipped == []
    return {p.fingerprint: p for p in trust.peers()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_lays_out_the_trust_directory_and_keeps_keys_on_a_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops = tmp_path / "ops"
    code, out, _ = fedq_keys(capsys, "init", str(ops))
    assert code == 0
    trusted = ops / "trusted"
    assert {p.name for p in trusted.iterdir()} == {"coordinator", "aggregator", "operator", "workers"}
    assert list((trusted / "workers").iterdir()) == []
    peers = roles(trusted)
    for role in ("operator", "coordinator", "aggregator"):
        key = ops / f"{role}.key"
        assert mode(key) == 0o600 and (ops / f"{role}.pub").exists()
        fp = load_or_create_signer(key).fingerprint
        assert (trusted / role / f"{fp}.pub").read_bytes() == (ops / f"{role}.pub").read_bytes()
        assert peers[fp].roles == {Role(role)} and f"{role:<12} {fp}  made" in out
    assert mode(ops) == 0o700
    assert "the coordinator's machine only" in out and "fedq keys enrol" in out
    before = {p: p.read_bytes() for p in ops.rglob("*") if p.is_file()}
    code, out, _ = fedq_keys(capsys, "init", str(ops))
    assert code == 0 and "kept" in out and "made" not in out.split("hand out")[0]
    assert {p: p.read_bytes() for p in ops.rglob("*") if p.is_file()} == before
    # the trust directory may live elsewhere (--trusted-keys); --json says what was made
    code, out, _ = fedq_keys(
        capsys, "init", str(tmp_path / "b"), "--trusted-keys", str(tmp_path / "t"), "--json"
    )
    done = json.loads(out)
    assert code == 0 and done["trusted_dir"] == str(tmp_path / "t") and all(k["made"] for k in done["keys"])
    assert len(roles(tmp_path / "t")) == 3


def test_enrol_list_and_revoke_a_worker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ops, site = tmp_path / "ops", tmp_path / "site"
    fedq_keys(capsys, "init", str(ops))
    trusted = str(ops / "trusted")
    code, out, _ = fedq_keys(capsys, "create", "site-1", "--keys-dir", str(site))
    worker = load_or_create_signer(site / "worker-site-1.key")
    assert code == 0 and mode(site / "worker-site-1.key") == 0o600 and worker.fingerprint in out
    code, out, _ = fedq_keys(
        capsys, "enrol", "site-1", str(site / "worker-site-1.pub"), "--trusted-keys", trusted
    )
    assert code == 0 and "enrolled" in out
    assert load_public_key(ops / "trusted" / "workers" / "site-1.pub") is not None
    peer = roles(ops / "trusted")[worker.fingerprint]
    assert (set(peer.roles), peer.worker_id) == ({Role.WORKER}, "site-1")
    code, out, _ = fedq_keys(
        capsys, "enrol", "site-1", str(site / "worker-site-1.pub"), "--trusted-keys", trusted
    )
    assert code == 0 and "already enrolled" in out  # idempotent

    code, out, _ = fedq_keys(capsys, "list", "--trusted-keys", trusted, "--json")
    found = json.loads(out)
    assert code == 0 and found["problems"] == [] and found["revoked"] == []
    assert {(k["role"], k["worker_id"]) for k in found["keys"]} == {
        ("coordinator", ""),
        ("aggregator", ""),
        ("operator", ""),
        ("worker", "site-1"),
    }
    code, out, _ = fedq_keys(capsys, "list", "--trusted-keys", trusted)
    assert code == 0 and f"worker       site-1               {worker.fingerprint}" in out

    code, out, _ = fedq_keys(capsys, "revoke", "site-1", "--trusted-keys", trusted)
    assert code == 0 and worker.fingerprint in out
    assert not (ops / "trusted" / "workers" / "site-1.pub").exists()
    assert read_revoked(ops / "trusted") == {worker.fingerprint}
    line = (ops / "trusted" / "revoked").read_text().splitlines()[-1]
    assert line.startswith(worker.fingerprint) and "worker site-1 revoked by" in line
    found = listing(ops / "trusted")
    assert found["revoked"] == [worker.fingerprint] and worker.fingerprint not in {
        k["fingerprint"] for k in found["keys"]
    }
    assert any("no worker key is trusted" in p for p in found["problems"])
    # a revoked key never comes back, under any id
    code, _, err = fedq_keys(
        capsys, "enrol", "site-2", str(site / "worker-site-1.pub"), "--trusted-keys", trusted
    )
    assert code == 2 and "revoked" in err


def test_revoke_a_fingerprint_whose_file_is_gone(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    gone = Signer.generate()
    fp, removed = revoke(trusted, gone.fingerprint)
    assert (fp, removed) == (gone.fingerprint, []) and read_revoked(trusted) == {fp}
    assert revoke(trusted, fp) == (fp, [])  # twice: listed once
    assert (trusted / "revoked").read_text().count(fp) == 1
    with pytest.raises(ConfigError, match="no worker 'nobody'"):
        revoke(trusted, "nobody")
    # revoking a coordinator key removes it from its role folder too
    init(tmp_path / "ops", trusted)
    coordinator = load_or_create_signer(tmp_path / "ops" / "coordinator.key")
    fp, removed = revoke(trusted, coordinator.fingerprint)
    assert removed == [str(trusted / "coordinator" / f"{fp}.pub")] and fp not in roles(trusted)


def test_enrol_refuses_what_it_must(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ops = tmp_path / "ops"
    init(ops, ops / "trusted")
    trusted = ops / "trusted"
    a, b = Signer.generate(), Signer.generate()
    enrol(trusted, "a", a.public)
    write_public_key(b.public, tmp_path / "b.pub")
    cases = {
        "not a worker id": ("../evil", tmp_path / "b.pub"),
        "cannot read public key": ("b", ops / "coordinator.key"),  # a private key is not a public key
        "already trusted for the coordinator": ("b", ops / "coordinator.pub"),
        "already trusted for worker a": ("b", trusted / "workers" / "a.pub"),
        "already enrolled with key": ("a", tmp_path / "b.pub"),
    }
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    cases["not an Ed25519 public key"] = ("b", ec_pub)
    for expected, (worker_id, pub) in cases.items():
        code, _, err = fedq_keys(capsys, "enrol", worker_id, str(pub), "--trusted-keys", str(trusted))
        assert code == 2 and expected in err, (expected, err)
    assert roles(trusted)[a.fingerprint].worker_id == "a"  # nothing changed
    assert sorted(p.name for p in (trusted / "workers").iterdir()) == ["a.pub"]
    # --replace gives worker a the new key; the old one is no longer trusted
    code, out, _ = fedq_keys(
        capsys, "enrol", "a", str(tmp_path / "b.pub"), "--trusted-keys", str(trusted), "--replace"
    )
    assert code == 0 and f"replaced {a.fingerprint}" in out
    peers = roles(trusted)
    assert a.fingerprint not in peers and peers[b.fingerprint].worker_id == "a"


def test_rotate_keeps_the_old_key_trusted_and_a_running_signer_follows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops = tmp_path / "ops"
    init(ops, ops / "trusted")
    trusted = ops / "trusted"
    running = key_file_signer(ops / "coordinator.key")  # as the coordinator service holds it
    old = running.current().fingerprint
    code, out, _ = fedq_keys(capsys, "rotate", "coordinator", "--keys-dir", str(ops))
    assert code == 0 and old in out and f"fedq keys revoke {old}" in out
    new = load_or_create_signer(ops / "coordinator.key").fingerprint
    assert new != old and mode(ops / "coordinator.key") == 0o600
    assert load_public_key(ops / "coordinator.pub") == load_or_create_signer(ops / "coordinator.key").public
    peers = roles(trusted)
    assert peers[old].roles == peers[new].roles == {Role.COORDINATOR}  # both trusted: old signatures verify
    time.sleep(RELOAD_SECONDS + 0.1)
    signer = running.current()
    assert signer.fingerprint == new
    trust = DirectoryTrust(trusted)
    assert trust.verify(new, signer.sign(b"task"), b"task").roles == {Role.COORDINATOR}

    rotation = rotate(ops, trusted, Role.AGGREGATOR)
    assert rotation.old != rotation.new and {rotation.old, rotation.new} <= set(roles(trusted))
    code, _, err = fedq_keys(capsys, "rotate", "coordinator", "--keys-dir", str(tmp_path / "nothing"))
    assert code == 2 and "no coordinator key to rotate" in err
    with pytest.raises(ConfigError):
        rotate(ops, trusted, Role.WORKER)


def test_directory_trust_drops_a_revoked_key_after_reload(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    worker = Signer.generate()
    enrol(trusted, "w1", worker.public)
    trust = DirectoryTrust(trusted, reload_seconds=0.0)
    data = b"update"
    assert trust.verify(worker.fingerprint, worker.sign(data), data).worker_id == "w1"
    revoke(trusted, "w1")
    assert worker.fingerprint not in trust
    write_public_key(worker.public, trusted / "workers" / "w1.pub")  # copied back by hand: still revoked
    trust.reload()
    assert worker.fingerprint not in trust


def test_fedq_run_enrols_its_workers_as_an_operator_would(tmp_path: Path) -> None:
    keys = prepare_keys(tmp_path / "run", ["w00", "w01"])
    trusted = keys / "trusted"
    assert sorted(p.name for p in trusted.glob("*.pub")) == []  # nothing loose in the old flat layout
    peers = roles(trusted)
    by_role = {(tuple(sorted(p.roles)), p.worker_id) for p in peers.values()}
    assert by_role == {
        (("coordinator",), ""),
        (("aggregator",), ""),
        (("operator",), ""),
        (("worker",), "w00"),
        (("worker",), "w01"),
    }
    for wid in ("w00", "w01"):
        path = keys / "workers" / wid / f"worker-{wid}.key"  # a folder of its own
        signer = load_or_create_signer(path)
        assert peers[signer.fingerprint].worker_id == wid and mode(path) == 0o600
    assert prepare_keys(tmp_path / "run", ["w00", "w01"]) == keys and roles(trusted) == peers  # idempotent
