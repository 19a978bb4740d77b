"""What is particular to the software key store: files at rest, sealing, export, atomicity."""

from __future__ import annotations

import os
import secrets
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.sealing import Sealer
from keystores.base import (
    NTE_BAD_KEY_STATE,
    NTE_BAD_KEYSET,
    HashAlg,
    KeyAlgorithm,
    KeySpec,
    KeyStore,
    KeyStoreError,
    TpmUnavailableError,
    key_id_for,
)
from keystores.software import SoftwareKeyStore, generate_private_key, write_atomic

EC = KeySpec(KeyAlgorithm.EC, 256)


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(secrets.token_bytes(32))


@pytest.fixture
def store(tmp_path: Path, sealer: Sealer) -> SoftwareKeyStore:
    return SoftwareKeyStore(tmp_path / "keys", sealer)


def test_is_a_keystore(store: SoftwareKeyStore) -> None:
    assert isinstance(store, KeyStore)
    assert store.kind == "software"


def test_files_and_modes(store: SoftwareKeyStore) -> None:
    h = store.create(KeySpec(KeyAlgorithm.EC, 256, label="ContainerA"))
    d = store.directory
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(f"{h.key_id}{s}" for s in (".json", ".key.pem", ".pw"))
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    pem = (d / f"{h.key_id}.key.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):  # encrypted: no password, no key
        serialization.load_pem_private_key(pem, None)
    # The password is sealed: the file is a DMS1 blob, not the password itself.
    assert (d / f"{h.key_id}.pw").read_bytes().startswith(b"DMS1")
    assert b"ContainerA" in (d / f"{h.key_id}.json").read_bytes()


def test_existing_loose_directory_is_tightened(tmp_path: Path, sealer: Sealer) -> None:
    d = tmp_path / "keys"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    SoftwareKeyStore(d, sealer).create(EC)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_wrong_sealing_key_is_a_clear_error(tmp_path: Path, store: SoftwareKeyStore) -> None:
    h = store.create(EC)
    other = SoftwareKeyStore(store.directory, Sealer(secrets.token_bytes(32)))
    with pytest.raises(KeyStoreError) as ei:
        other.load(h.key_id)
    assert ei.value.hresult == NTE_BAD_KEYSET
    assert "does not unseal" in ei.value.message
    assert "machine key" in ei.value.advice
    assert other.list_ids() == [h.key_id]  # still there: nothing was destroyed


def test_unavailable_tpm_sealer_is_not_reported_as_a_wrong_key(
        store: SoftwareKeyStore) -> None:
    """A TPM-backed Sealing whose TPM is down: the error says so (see test_keystore_tpm for the
    real TpmSealer); this stand-in only raises what TpmSealer raises then."""
    h = store.create(EC)

    class DownSealer:
        def seal(self, plaintext: bytes, purpose: str) -> bytes:
            raise AssertionError("not called")

        def unseal(self, blob: bytes, purpose: str) -> bytes:
            raise TpmUnavailableError("the TPM at 'swtpm:...' does not answer")

    with pytest.raises(TpmUnavailableError):
        SoftwareKeyStore(store.directory, DownSealer()).load(h.key_id)


def test_password_bound_to_its_key(store: SoftwareKeyStore) -> None:
    """A sealed password moved next to another key does not unseal (purpose = key id)."""
    a, b = store.create(EC), store.create(EC)
    d = store.directory
    (d / f"{b.key_id}.pw").write_bytes((d / f"{a.key_id}.pw").read_bytes())
    with pytest.raises(KeyStoreError, match="does not unseal"):
        store.load(b.key_id)
    assert store.load(a.key_id).key_id == a.key_id


def test_swapped_key_file_detected(store: SoftwareKeyStore) -> None:
    a, b = store.create(EC), store.create(EC)
    d = store.directory
    for suffix in (".key.pem", ".pw"):
        (d / f"{b.key_id}{suffix}").write_bytes((d / f"{a.key_id}{suffix}").read_bytes())
    with pytest.raises(KeyStoreError):  # the password is bound to a's id, so it fails early
        store.load(b.key_id)


@pytest.mark.parametrize("damage", [b"", b"{}", b"not json", b'{"version": 99}'])
def test_damaged_metadata(store: SoftwareKeyStore, damage: bytes) -> None:
    h = store.create(EC)
    (store.directory / f"{h.key_id}.json").write_bytes(damage)
    with pytest.raises(KeyStoreError, match="metadata") as ei:
        store.load(h.key_id)
    assert ei.value.hresult == NTE_BAD_KEYSET


def test_damaged_key_file(store: SoftwareKeyStore) -> None:
    h = store.create(EC)
    (store.directory / f"{h.key_id}.key.pem").write_bytes(b"-----BEGIN garbage")
    with pytest.raises(KeyStoreError, match="damaged") as ei:
        store.load(h.key_id)
    assert ei.value.hresult == NTE_BAD_KEYSET


def test_export_when_exportable(store: SoftwareKeyStore) -> None:
    h = store.create(KeySpec(KeyAlgorithm.EC, 384, exportable=True))
    pem = store.load(h.key_id).export_pkcs8(b"export-pw")
    key = serialization.load_pem_private_key(pem, b"export-pw")
    assert key_id_for(key.public_key()) == h.key_id  # type: ignore[arg-type]
    with pytest.raises(KeyStoreError):
        h.export_pkcs8(b"")


def test_export_refused_names_the_state(store: SoftwareKeyStore) -> None:
    h = store.create(EC)
    with pytest.raises(KeyStoreError, match="not exportable") as ei:
        h.export_pkcs8(b"pw")
    assert ei.value.hresult == NTE_BAD_KEY_STATE == 0x8009000B


def test_orphan_side_files_are_not_keys(store: SoftwareKeyStore) -> None:
    """A crash between the side files and the key file leaves no half key behind."""
    h = store.create(EC)
    orphan = "cd" * 20
    (store.directory / f"{orphan}.json").write_bytes(b"{}")
    (store.directory / f"{orphan}.pw").write_bytes(b"DMS1")
    (store.directory / "not-a-key.key.pem").write_bytes(b"")
    assert store.list_ids() == [h.key_id]


def test_write_atomic_failure_leaves_nothing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary left behind


def test_no_temporary_files_after_create(store: SoftwareKeyStore) -> None:
    store.create(EC)
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".")]


def test_list_on_missing_directory(tmp_path: Path, sealer: Sealer) -> None:
    s = SoftwareKeyStore(tmp_path / "nope", sealer)
    assert s.list_ids() == []
    s.delete("ab" * 20)
    assert not (tmp_path / "nope").exists()


def test_rsa_4096_supported(store: SoftwareKeyStore) -> None:
    """The one RSA-4096 generation in the suite (~1 s)."""
    spec = KeySpec(KeyAlgorithm.RSA, 4096)
    store.check(spec)
    h = store.create(spec)
    pub = h.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    assert pub.key_size == 4096
    sig = store.load(h.key_id).sign(b"data", HashAlg.SHA512)
    pub.verify(sig, b"data", padding.PKCS1v15(), hashes.SHA512())


def test_concurrent_creates(store: SoftwareKeyStore) -> None:
    """Creates run in parallel threads (asyncio.to_thread) without locks or collisions."""
    with ThreadPoolExecutor(4) as pool:
        handles = list(pool.map(lambda _: store.create(EC), range(8)))
    ids = {h.key_id for h in handles}
    assert len(ids) == 8
    assert set(store.list_ids()) == ids
    for h in handles:
        assert store.load(h.key_id).public_key() == h.public_key()


def test_create_stores_a_key_generated_beforehand(store: SoftwareKeyStore) -> None:
    """`scep enroll` generates the key before the store is open, then stores it."""
    spec = KeySpec(KeyAlgorithm.RSA, 2048)
    private_key = generate_private_key(spec)
    handle = store.create(spec, private_key=private_key)
    assert handle.key_id == key_id_for(private_key.public_key())
    loaded = store.load(handle.key_id)
    assert loaded.public_key().public_numbers() == private_key.public_key().public_numbers()  # type: ignore[union-attr]
    assert store.list_ids() == [handle.key_id]


@pytest.mark.parametrize(("spec", "other"), [
    (KeySpec(KeyAlgorithm.RSA, 2048), KeySpec(KeyAlgorithm.RSA, 1024)),
    (KeySpec(KeyAlgorithm.RSA, 2048), KeySpec(KeyAlgorithm.EC, 256)),
    (KeySpec(KeyAlgorithm.EC, 384), KeySpec(KeyAlgorithm.EC, 256)),
])
def test_create_refuses_a_key_that_does_not_match_the_spec(
        store: SoftwareKeyStore, spec: KeySpec, other: KeySpec) -> None:
    with pytest.raises(KeyStoreError, match="does not match"):
        store.create(spec, private_key=generate_private_key(other))
    assert store.list_ids() == []
