"""GetCACert parsing, CA/RA role assignment and the CAThumbprint check."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.scep.cacerts import (
    CT_CA_CERT,
    CT_CA_RA_CERT,
    check_ca_thumbprint,
    normalize_thumbprint,
    parse_ca_certs,
    thumbprint,
)
from agent.scep.certificate import as_certificate as ours
from agent.scep.cms import degenerate_certs_only
from tests.scep_support import make_ca, make_cert, make_ndes_like


def test_single_der_certificate() -> None:
    ca = make_ca()
    got = parse_ca_certs(ca.cert.public_bytes(Encoding.DER), CT_CA_CERT)
    assert got.ca == ours(ca.cert) and got.encryption == ours(ca.cert)
    assert got.signers == (ours(ca.cert),)
    assert not got.has_ra


@pytest.mark.parametrize("content_type", [CT_CA_RA_CERT, "", "application/octet-stream"])
def test_ndes_like_ra_pair_roles_by_key_usage(content_type: str) -> None:
    ca, ra_sign, ra_enc = make_ndes_like()
    # NDES order varies; roles must come from key usage, not position
    body = degenerate_certs_only([ra_sign.cert, ca.cert, ra_enc.cert])
    got = parse_ca_certs(body, content_type)
    assert got.has_ra
    assert got.ca == ours(ca.cert)
    assert got.encryption == ours(ra_enc.cert)
    assert got.signers[0] == ours(ra_sign.cert)
    assert ours(ra_enc.cert) not in got.signers


def test_single_ra_with_both_usages() -> None:
    ca = make_ca()
    ra = make_cert("RA", issuer=ca, key_usage={"digital_signature": True,
                                               "key_encipherment": True})
    got = parse_ca_certs(degenerate_certs_only([ca.cert, ra.cert]), CT_CA_RA_CERT)
    assert got.encryption == ours(ra.cert) and got.signers[0] == ours(ra.cert)


def test_chain_without_ra_uses_issuing_ca() -> None:
    root = make_ca("Root")
    issuing = make_cert("Issuing", issuer=root, ca=True,
                        key_usage={"key_cert_sign": True, "crl_sign": True})
    got = parse_ca_certs(degenerate_certs_only([root.cert, issuing.cert]), CT_CA_RA_CERT)
    assert got.ca == ours(issuing.cert) and got.encryption == ours(issuing.cert)
    assert got.signers[0] == ours(issuing.cert)


def test_ra_that_cannot_encrypt_is_refused() -> None:
    ca = make_ca()
    ra = make_cert("RA", issuer=ca, key_usage={"digital_signature": True})
    with pytest.raises(PeerError) as err:
        parse_ca_certs(degenerate_certs_only([ca.cert, ra.cert]), CT_CA_RA_CERT)
    assert err.value.hresult == HResult.CERT_E_WRONG_USAGE
    assert "encrypt" in err.value.message


@pytest.mark.parametrize(("body", "ctype", "hresult"), [
    (b"", CT_CA_CERT, HResult.CRYPT_E_ASN1_EOD),
    (b"\x30\x03\x02\x01\x01", CT_CA_CERT, HResult.CRYPT_E_BAD_ENCODE),
    (b"not der at all", CT_CA_RA_CERT, HResult.CRYPT_E_ASN1_BADTAG),
    (degenerate_certs_only([]), CT_CA_RA_CERT, HResult.CRYPT_E_NOT_FOUND),
])
def test_bad_bodies(body: bytes, ctype: str, hresult: int) -> None:
    with pytest.raises(PeerError) as err:
        parse_ca_certs(body, ctype)
    assert err.value.hresult == hresult


@pytest.mark.parametrize("transform", [
    str.upper, str.lower, lambda t: " ".join(t[i:i + 2] for i in range(0, len(t), 2)),
    lambda t: ":".join(t[i:i + 2] for i in range(0, len(t), 2)), lambda t: f"\u200e{t} \n"])
def test_thumbprint_is_case_and_space_insensitive(transform: object) -> None:
    ca, ra_sign, ra_enc = make_ndes_like()
    got = parse_ca_certs(degenerate_certs_only([ca.cert, ra_sign.cert, ra_enc.cert]))
    for cert in (ca.cert, ra_sign.cert):
        check_ca_thumbprint(got, transform(thumbprint(cert)), "http://x")  # type: ignore[operator]


def test_thumbprint_mismatch_message_like_windows() -> None:
    ca = make_ca()
    got = parse_ca_certs(ca.cert.public_bytes(Encoding.DER), CT_CA_CERT)
    wrong = "0c93e3b330ac0f3770cced39ce5edcbd23919305"
    with pytest.raises(PeerError) as err:
        check_ca_thumbprint(got, wrong, "https://ndes.example/certsrv/mscep/mscep.dll/pkiclient.exe")
    assert err.value.hresult == HResult.CERT_E_UNTRUSTEDCA == 0x800B0112
    assert err.value.message == (
        "Failed to Initialize SCEP enrollment with NDES Server "
        "'https://ndes.example/certsrv/mscep/mscep.dll/pkiclient.exe', CA cert thumbprint "
        f"'{wrong.upper()}' and server certs '{thumbprint(ca.cert)}'")


def test_empty_thumbprint_means_no_check() -> None:
    ca = make_ca()
    check_ca_thumbprint(parse_ca_certs(ca.cert.public_bytes(Encoding.DER)), "  ", "http://x")


def test_normalize() -> None:
    assert normalize_thumbprint(" ab:CD ef\t") == "ABCDEF"
