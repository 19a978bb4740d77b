"""RootCATrustedCertificates: add by SHA-1 with a base64 DER, hash check, Get views, Delete."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.certstore import thumbprint
from agent.registry import RegType
from tests.unit.dmtree_support import (
    USER_SID,
    Env,
    add,
    codes,
    delete,
    get_code,
    make_env,
    rep,
    value_of,
)

ROOT = "./Device/Vendor/MSFT/RootCATrustedCertificates/Root"
CA = "./Vendor/MSFT/RootCATrustedCertificates/CA"


def make_ca(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Contoso")])
    start = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


@pytest.fixture
def der() -> bytes:
    return make_ca("Contoso Root")


def test_add_get_delete_root(env: Env, der: bytes) -> None:
    tp = thumbprint(der)
    b64 = base64.b64encode(der).decode()
    assert codes(env.run(add("1", f"{ROOT}/{tp.lower()}/EncodedCertificate", b64, "b64"))) == [
        ("Add", "1", 200)]
    key = rf"HKLM\SOFTWARE\Microsoft\SystemCertificates\ROOT\Certificates\{tp}"
    blob = env.registry.get_value(key, "Blob")
    assert (blob.type, blob.data) == (RegType.REG_BINARY, der)
    assert value_of(env, f"{ROOT}/{tp}/EncodedCertificate") == ("b64", b64)
    assert value_of(env, ROOT) == ("node", tp)
    assert value_of(env, f"{ROOT}/{tp}/IssuedTo") == ("chr", "O=Contoso,CN=Contoso Root")
    assert value_of(env, f"{ROOT}/{tp}/IssuedBy") == ("chr", "O=Contoso,CN=Contoso Root")
    assert value_of(env, f"{ROOT}/{tp}/ValidFrom") == ("chr", "2024-01-02T03:04:05Z")
    assert value_of(env, f"{ROOT}/{tp}/ValidTo") == ("chr", "2033-12-30T03:04:05Z")
    assert value_of(env, f"{ROOT}/{tp}") == (
        "node", "EncodedCertificate/IssuedBy/IssuedTo/ValidFrom/ValidTo/TemplateName")
    out = env.run(add("2", f"{ROOT}/{tp}/EncodedCertificate", b64),
                  rep("3", f"{ROOT}/{tp}/EncodedCertificate", b64, "chr"),
                  rep("4", f"{ROOT}/{tp}/IssuedBy", "x"),
                  delete("5", f"{ROOT}/{tp}"), delete("6", f"{ROOT}/{tp}"))
    assert [c for _, _, c in codes(out)] == [418, 200, 405, 200, 404]
    assert not env.registry.key_exists(key)
    assert get_code(env, f"{ROOT}/{tp}/EncodedCertificate") == 404


def test_hash_must_match_the_certificate(env: Env, der: bytes) -> None:
    other = thumbprint(make_ca("Other"))
    b64 = base64.b64encode(der).decode()
    out = env.run(add("1", f"{ROOT}/{other}/EncodedCertificate", b64),
                  add("2", f"{ROOT}/not-a-hash/EncodedCertificate", b64),
                  add("3", f"{ROOT}/{thumbprint(der)}/EncodedCertificate", "!!notbase64!!"),
                  add("4", f"{ROOT}/{thumbprint(b'junk')}/EncodedCertificate",
                      base64.b64encode(b"junk").decode()),
                  add("5", f"{ROOT}/{thumbprint(der)}/EncodedCertificate", b64, "int"))
    assert [c for _, _, c in codes(out)] == [400, 400, 400, 400, 415]
    assert value_of(env, ROOT) == ("node", "")


def test_ca_store_and_user_scope(env: Env, der: bytes) -> None:
    tp = thumbprint(der)
    # base64 wrapped at 64 columns, as PEM bodies are: the line breaks are ignored
    b64 = base64.encodebytes(der).decode()
    out = env.run(add("1", f"{CA}/{tp}/EncodedCertificate", b64),
                  add("2", f"./User/Vendor/MSFT/RootCATrustedCertificates/Root/{tp}"
                           "/EncodedCertificate", b64))
    assert [c for _, _, c in codes(out)] == [200, 200]
    assert env.registry.key_exists(
        rf"HKLM\SOFTWARE\Microsoft\SystemCertificates\CA\Certificates\{tp}")
    assert env.registry.key_exists(
        rf"HKU\{USER_SID}\Software\Microsoft\SystemCertificates\ROOT\Certificates\{tp}")
    assert value_of(env, ROOT) == ("node", "")
