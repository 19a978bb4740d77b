"""Certificate stores in the registry: add/get/list/delete per scope, links, transactions."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.certstore import CertStore, Scope, StoreName, normalize_thumbprint, thumbprint
from agent.errors import LocalError, NotFoundError
from agent.registry import Registry, Rollback


def make_cert(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def store(tmp_path: Path) -> CertStore:
    return CertStore(Registry(tmp_path / "r.db", current_user_sid="S-1-12-1-9-9-9-9"))


def test_add_get_list_delete_device_and_user(store: CertStore) -> None:
    der = make_cert("device")
    added = store.add(Scope.DEVICE, StoreName.MY, der, key_id="ab" * 20, key_store="tpm",
                      unique_id="UID1")
    tp = thumbprint(der)
    assert added.thumbprint == tp
    assert store.registry.query(
        rf"HKLM\SOFTWARE\Microsoft\SystemCertificates\MY\Certificates\{tp}", "Blob") == der
    got = store.get(Scope.DEVICE, StoreName.MY, tp.lower())
    assert (got.key_id, got.key_store, got.unique_id, got.subject) == (
        "ab" * 20, "tpm", "UID1", "CN=device")
    user_der = make_cert("user")
    store.add(Scope.USER, StoreName.MY, user_der, unique_id="UID2")
    assert store.registry.key_exists(
        rf"HKU\S-1-12-1-9-9-9-9\Software\Microsoft\SystemCertificates\MY\Certificates\{thumbprint(user_der)}")
    assert [c.thumbprint for c in store.list_store(Scope.USER, StoreName.MY)] == [
        thumbprint(user_der)]
    assert store.find(thumbprint(user_der)).scope is Scope.USER
    assert [c.thumbprint for c in store.by_unique_id(Scope.DEVICE, "uid1")] == [tp]
    assert store.delete(Scope.DEVICE, StoreName.MY, tp)
    with pytest.raises(NotFoundError):
        store.get(Scope.DEVICE, StoreName.MY, tp)
    assert store.list_store(Scope.DEVICE, StoreName.ROOT) == []


def test_add_joins_the_callers_transaction(store: CertStore) -> None:
    der = make_cert("x")
    with store.registry.transaction():
        store.add(Scope.DEVICE, StoreName.MY, der)
        raise Rollback
    assert store.list_store(Scope.DEVICE, StoreName.MY) == []


def test_replacing_drops_stale_links(store: CertStore) -> None:
    der = make_cert("x")
    store.add(Scope.DEVICE, StoreName.MY, der, key_id="cd" * 20, key_store="software")
    store.add(Scope.DEVICE, StoreName.MY, der)
    assert store.get(Scope.DEVICE, StoreName.MY, thumbprint(der)).key_id == ""


@pytest.mark.parametrize("bad", ["", "12", "G" * 40, "AB" * 21])
def test_bad_thumbprints(bad: str) -> None:
    with pytest.raises(LocalError):
        normalize_thumbprint(bad)


def test_thumbprint_forms_and_bad_der(store: CertStore) -> None:
    assert normalize_thumbprint("ab:cd " + "0" * 36) == "ABCD" + "0" * 36
    with pytest.raises(LocalError, match="not a DER certificate"):
        store.add(Scope.DEVICE, StoreName.MY, b"garbage")
