"""The key-store contract: every store (software KSP, TPM on a real swtpm) passes the same tests.

Signatures are verified and ciphertexts made with `cryptography`, independently of the store.
Keys are expensive (RSA generation, TPM create), so the signing/decryption keys are made once per
module and store; the lifecycle tests make their own.
"""

from __future__ import annotations

import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.sealing import Sealer
from keystores.base import (
    NTE_BAD_KEY_STATE,
    NTE_NOT_SUPPORTED,
    HashAlg,
    KeyAlgorithm,
    KeyHandle,
    KeyNotFoundError,
    KeySpec,
    KeyStore,
    KeyStoreError,
    Padding,
    UnsupportedKeyError,
    key_id_for,
)
from keystores.software import SoftwareKeyStore

HASHES = {HashAlg.SHA1: hashes.SHA1(), HashAlg.SHA256: hashes.SHA256(),
          HashAlg.SHA384: hashes.SHA384(), HashAlg.SHA512: hashes.SHA512()}

StoreFactory = Callable[[], KeyStore]


def spec_id(spec: KeySpec) -> str:
    return f"{spec.algorithm.value}-{spec.size}{'-exportable' if spec.exportable else ''}"


def _software_factory(tmp: Path) -> StoreFactory:
    sealer = Sealer(secrets.token_bytes(32))
    return lambda: SoftwareKeyStore(tmp / "keys", sealer)


def _tpm_factory(tmp: Path, request: pytest.FixtureRequest) -> StoreFactory:
    from keystores.tpm import TpmKeyStore

    tcti = request.getfixturevalue("swtpm").tcti
    return lambda: TpmKeyStore(tcti, tmp / "tpmkeys")


KINDS = ["software", pytest.param("tpm", marks=pytest.mark.swtpm)]


def _factory(kind: str, tmp: Path, request: pytest.FixtureRequest) -> StoreFactory:
    return _software_factory(tmp) if kind == "software" else _tpm_factory(tmp, request)


@pytest.fixture(params=KINDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """A factory of store instances over one directory (a second instance = a restart)."""
    return _factory(request.param, tmp_path, request)


@pytest.fixture
def store(make_store: StoreFactory) -> KeyStore:
    return make_store()


@pytest.fixture(scope="module", params=KINDS)
def keys(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One RSA-2048, one P-256 and one P-384 key per store kind, shared by the module."""
    s = _factory(request.param, tmp_path_factory.mktemp(request.param), request)()
    yield {"store": s, "rsa": s.create(KeySpec(KeyAlgorithm.RSA, 2048)),
           "p256": s.create(KeySpec(KeyAlgorithm.EC, 256)),
           "p384": s.create(KeySpec(KeyAlgorithm.EC, 384))}


# --- lifecycle ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [KeySpec(KeyAlgorithm.RSA, 2048, label="c1"),
                                  KeySpec(KeyAlgorithm.RSA, 1024),
                                  KeySpec(KeyAlgorithm.EC, 256),
                                  KeySpec(KeyAlgorithm.EC, 384)], ids=spec_id)
def test_create_load_delete_round_trip(make_store: StoreFactory, spec: KeySpec) -> None:
    store = make_store()
    h = store.create(spec)
    assert isinstance(h, KeyHandle)
    pub = h.public_key()
    if spec.algorithm is KeyAlgorithm.RSA:
        assert isinstance(pub, rsa.RSAPublicKey)
        assert pub.key_size == spec.size
        assert pub.public_numbers().e == 65537
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert pub.curve.key_size == spec.size
    assert h.key_id == key_id_for(pub)  # the stable id is derived from the public key
    assert h.spec == spec
    assert store.list_ids() == [h.key_id]

    # A fresh instance over the same directory (a restart) finds the same key and it works.
    again = make_store().load(h.key_id)
    assert again.key_id == h.key_id
    assert again.spec == spec
    assert key_id_for(again.public_key()) == h.key_id
    sig = again.sign(b"after restart", HashAlg.SHA256)
    _verify(pub, sig, b"after restart", HashAlg.SHA256, Padding.PKCS1V15)

    store.delete(h.key_id)
    assert store.list_ids() == []
    with pytest.raises(KeyNotFoundError):
        make_store().load(h.key_id)
    store.delete(h.key_id)  # idempotent


def test_ids_are_distinct_and_listed(store: KeyStore) -> None:
    a = store.create(KeySpec(KeyAlgorithm.EC, 256))
    b = store.create(KeySpec(KeyAlgorithm.EC, 256))
    assert a.key_id != b.key_id
    assert store.list_ids() == sorted([a.key_id, b.key_id])
    store.delete(a.key_id)
    assert store.list_ids() == [b.key_id]


def test_load_missing_key(store: KeyStore) -> None:
    with pytest.raises(KeyNotFoundError) as ei:
        store.load("00" * 20)
    assert ei.value.hresult == 0x80090016  # NTE_BAD_KEYSET


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABCDEF", "", "0" * 41])
def test_malformed_key_id_refused(store: KeyStore, bad: str) -> None:
    with pytest.raises(KeyStoreError) as ei:
        store.load(bad)
    assert ei.value.hresult == 0x80070057  # E_INVALIDARG
    with pytest.raises(KeyStoreError):
        store.delete(bad)


def test_delete_missing_is_idempotent(store: KeyStore) -> None:
    store.delete("ab" * 20)
    assert store.list_ids() == []


@pytest.mark.parametrize("spec", [KeySpec(KeyAlgorithm.RSA, 3000), KeySpec(KeyAlgorithm.RSA, 512),
                                  KeySpec(KeyAlgorithm.EC, 521), KeySpec(KeyAlgorithm.EC, 224)],
                         ids=spec_id)
def test_check_refuses_sizes_outside_the_interface(store: KeyStore, spec: KeySpec) -> None:
    with pytest.raises(UnsupportedKeyError) as ei:
        store.check(spec)
    assert ei.value.hresult == NTE_NOT_SUPPORTED
    assert str(spec.size) in ei.value.message
    assert ei.value.advice
    with pytest.raises(UnsupportedKeyError):
        store.create(spec)
    assert store.list_ids() == []


def test_rsa_4096_checked_up_front(store: KeyStore) -> None:
    """swtpm refuses RSA-4096 (TPM2_TestParms); the software KSP makes it (created once, in
    tests/unit/test_keystore_software.py, because it takes ~1 s)."""
    spec = KeySpec(KeyAlgorithm.RSA, 4096)
    if store.kind == "software":
        store.check(spec)
        return
    with pytest.raises(UnsupportedKeyError) as ei:
        store.check(spec)
    assert "RSA-4096" in ei.value.message
    assert "KeyProtection 3" in ei.value.advice
    with pytest.raises(UnsupportedKeyError):
        store.create(spec)
    assert store.list_ids() == []


def test_files_are_private(store: KeyStore) -> None:
    store.create(KeySpec(KeyAlgorithm.EC, 256))
    directory: Path = store.directory  # type: ignore[attr-defined]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert len(files) >= 2
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_non_exportable_by_default(store: KeyStore) -> None:
    h = store.create(KeySpec(KeyAlgorithm.EC, 256))
    assert h.spec.exportable is False
    with pytest.raises(KeyStoreError) as ei:
        h.export_pkcs8(b"pw")
    assert ei.value.hresult == NTE_BAD_KEY_STATE
    with pytest.raises(KeyStoreError) as ei:
        store.load(h.key_id).export_pkcs8(b"pw")
    assert ei.value.hresult == NTE_BAD_KEY_STATE


# --- sign -----------------------------------------------------------------------------------

def _verify(pub: Any, sig: bytes, data: bytes, h: HashAlg, pad: Padding) -> None:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(sig, data, ec.ECDSA(HASHES[h]))
    elif pad is Padding.PSS:
        pub.verify(sig, data, padding.PSS(padding.MGF1(HASHES[h]), padding.PSS.DIGEST_LENGTH),
                   HASHES[h])
    else:
        pub.verify(sig, data, padding.PKCS1v15(), HASHES[h])


@pytest.mark.parametrize("h", list(HashAlg))
@pytest.mark.parametrize("pad", [Padding.PKCS1V15, Padding.PSS])
def test_rsa_sign_verifies(keys: dict[str, Any], h: HashAlg, pad: Padding) -> None:
    key: KeyHandle = keys["rsa"]
    data = secrets.token_bytes(100)
    sig = key.sign(data, h, pad)
    assert len(sig) == 256
    _verify(key.public_key(), sig, data, h, pad)
    with pytest.raises(InvalidSignature):
        _verify(key.public_key(), sig, data + b"x", h, pad)


@pytest.mark.parametrize("h", list(HashAlg))
@pytest.mark.parametrize("curve", ["p256", "p384"])
def test_ecdsa_sign_verifies(keys: dict[str, Any], h: HashAlg, curve: str) -> None:
    key: KeyHandle = keys[curve]
    data = secrets.token_bytes(100)
    sig = key.sign(data, h)
    assert sig[0] == 0x30  # DER SEQUENCE {r, s}
    _verify(key.public_key(), sig, data, h, Padding.PKCS1V15)
    with pytest.raises(InvalidSignature):
        _verify(key.public_key(), sig, b"other", h, Padding.PKCS1V15)


def test_sign_with_encryption_padding_refused(keys: dict[str, Any]) -> None:
    with pytest.raises(KeyStoreError):
        keys["rsa"].sign(b"x", HashAlg.SHA256, Padding.OAEP)


# --- decrypt ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("pad", "h"), [(Padding.PKCS1V15, HashAlg.SHA1),
                                        (Padding.OAEP, HashAlg.SHA1),
                                        (Padding.OAEP, HashAlg.SHA256)])
def test_rsa_decrypt(keys: dict[str, Any], pad: Padding, h: HashAlg) -> None:
    key: KeyHandle = keys["rsa"]
    pub = key.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    cek = secrets.token_bytes(32)  # an AES-256 content-encryption key, as in a CertRep envelope
    if pad is Padding.OAEP:
        ct = pub.encrypt(cek, padding.OAEP(padding.MGF1(HASHES[h]), HASHES[h], None))
    else:
        ct = pub.encrypt(cek, padding.PKCS1v15())
    assert key.decrypt(ct, pad, oaep_hash=h) == cek


def test_oaep_decrypt_of_garbage_is_a_keystore_error(keys: dict[str, Any]) -> None:
    with pytest.raises(KeyStoreError):
        keys["rsa"].decrypt(secrets.token_bytes(256), Padding.OAEP)


def test_oaep_hash_mismatch_is_a_keystore_error(keys: dict[str, Any]) -> None:
    pub = keys["rsa"].public_key()
    ct = pub.encrypt(b"k" * 16, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    with pytest.raises(KeyStoreError):
        keys["rsa"].decrypt(ct, Padding.OAEP, oaep_hash=HashAlg.SHA1)


def test_ecdsa_key_cannot_decrypt(keys: dict[str, Any]) -> None:
    with pytest.raises(KeyStoreError) as ei:
        keys["p256"].decrypt(b"\0" * 32)
    assert ei.value.hresult == NTE_NOT_SUPPORTED


# --- use from the event loop ------------------------------------------------------------------

def test_usable_through_asyncio_to_thread(store: KeyStore) -> None:
    """How the agent calls stores: blocking work off the loop, several devices at once."""
    import asyncio

    async def enroll_like(i: int) -> bool:
        h = await asyncio.to_thread(store.create, KeySpec(KeyAlgorithm.EC, 256))
        data = f"csr {i}".encode()
        sig = await asyncio.to_thread(h.sign, data, HashAlg.SHA256)
        _verify(h.public_key(), sig, data, HashAlg.SHA256, Padding.PKCS1V15)
        return (await asyncio.to_thread(store.load, h.key_id)).key_id == h.key_id

    async def main() -> list[bool]:
        return list(await asyncio.gather(*(enroll_like(i) for i in range(6))))

    assert asyncio.run(main()) == [True] * 6
    assert len(store.list_ids()) == 6
