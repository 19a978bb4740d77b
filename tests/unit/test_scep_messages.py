"""agent.scep.messages: requests as a CA decodes them, and every CertRep check."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from asn1crypto import cms as acms

from agent.csr import CsrRequest, build_csr
from agent.diagnostics import FailInfo, HResult
from agent.errors import PeerError
from agent.scep import messages as m
from agent.scep.capabilities import Algorithms, ContentCipher
from agent.scep.certificate import Certificate, as_certificate
from agent.scep.errors import ScepFailure
from keystores.base import HashAlg
from tests.scep_support import (
    CertAndKey,
    CryptoKeyHandle,
    ParsedRequest,
    issue_from_csr,
    make_ca,
    make_cert,
    make_cert_rep,
    parse_request,
    to_ber,
)

NOW = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
AES_SHA256 = Algorithms(ContentCipher.AES128, HashAlg.SHA256, True)


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return make_ca()


@pytest.fixture(scope="module")
def client_key() -> CryptoKeyHandle:
    return CryptoKeyHandle.rsa()


def _request(ca: CertAndKey, key: CryptoKeyHandle,
             algs: Algorithms = AES_SHA256) -> tuple[m.PendingRequest, ParsedRequest, bytes]:
    csr = build_csr(CsrRequest(subject="CN=dev1, O=Test", challenge="secret"), key)
    req = m.pkcs_req(csr, handle=key, recipient=ca.cert, algorithms=algs, now=NOW)
    return req, parse_request(req.der, ca), csr


@pytest.mark.parametrize("cipher", list(ContentCipher))
@pytest.mark.parametrize("digest", [HashAlg.SHA1, HashAlg.SHA256, HashAlg.SHA512])
def test_pkcs_req_as_the_ca_sees_it(ca: CertAndKey, client_key: CryptoKeyHandle,
                                    cipher: ContentCipher, digest: HashAlg) -> None:
    req, parsed, csr = _request(ca, client_key, Algorithms(cipher, digest, False))
    assert parsed.message_type == 19
    assert parsed.transaction_id == req.transaction_id == m.transaction_id_for(
        client_key.public_key())
    assert len(req.transaction_id) == 40 and req.transaction_id == req.transaction_id.lower()
    assert parsed.sender_nonce == req.sender_nonce and len(req.sender_nonce) == 16
    assert parsed.message_data == csr
    assert parsed.digest_alg is digest
    assert parsed.cipher == {"des-cbc": "des", "3des-cbc": "tripledes_3key",
                             "aes128-cbc": "aes128_cbc", "aes192-cbc": "aes192_cbc",
                             "aes256-cbc": "aes256_cbc"}[cipher.value]


def test_transient_certificate(client_key: CryptoKeyHandle) -> None:
    from agent.csr import subject_der

    ours = m.transient_certificate(client_key, subject_der("CN=dev1, O=Test"), NOW)
    assert ours.subject_der == ours.issuer_der and ours.subject == "CN=dev1, O=Test"
    cert = ours.to_x509()  # cryptography reads what we built the same way
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "O=Test,CN=dev1"
    assert cert.public_key().public_numbers() == client_key.public_key().public_numbers()
    cert.verify_directly_issued_by(cert)
    assert cert.not_valid_before_utc == ours.not_valid_before_utc < NOW
    assert NOW < cert.not_valid_after_utc == ours.not_valid_after_utc
    assert cert.serial_number == ours.serial_number
    empty = m.transient_certificate(client_key, subject_der(""), NOW)
    assert "SCEP transient" in empty.to_x509().subject.rfc4514_string()


def test_nonces_are_fresh(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    a, _, _ = _request(ca, client_key)
    b, _, _ = _request(ca, client_key)
    assert a.sender_nonce != b.sender_nonce
    assert a.transaction_id == b.transaction_id  # same key, same transaction id


def test_success_reply(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    req, parsed, csr = _request(ca, client_key)
    issued = issue_from_csr(csr, ca)
    rep = m.parse_cert_rep(make_cert_rep(parsed, ca, certs=(ca.cert, issued)), req,
                           trusted=[ca.cert], handle=client_key,
                           expected_key=client_key.public_key())
    assert rep.status is m.PkiStatus.SUCCESS
    assert rep.issued == as_certificate(issued)
    assert rep.chain == (as_certificate(ca.cert),)
    assert rep.recipient_nonce == req.sender_nonce


@pytest.mark.parametrize("cipher", ["des-cbc", "3des-cbc", "aes128-cbc", "aes256-cbc"])
@pytest.mark.parametrize("oaep", [None, HashAlg.SHA256])
@pytest.mark.parametrize("ber", [False, True])
def test_reply_ciphers_key_transport_and_ber(ca: CertAndKey, client_key: CryptoKeyHandle,
                                             cipher: str, oaep: HashAlg | None,
                                             ber: bool) -> None:
    req, parsed, csr = _request(ca, client_key)
    issued = issue_from_csr(csr, ca)
    body = make_cert_rep(parsed, ca, certs=(issued,), cipher=cipher, oaep=oaep)
    if ber:
        body = to_ber(body)
    rep = m.parse_cert_rep(body, req, trusted=[ca.cert], handle=client_key,
                           expected_key=client_key.public_key())
    assert rep.issued == as_certificate(issued)


def test_pending_reply(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    req, parsed, _ = _request(ca, client_key)
    rep = m.parse_cert_rep(make_cert_rep(parsed, ca, status=3), req, trusted=[ca.cert],
                           handle=client_key, expected_key=client_key.public_key())
    assert rep.status is m.PkiStatus.PENDING and rep.issued is None


@pytest.mark.parametrize("info", list(FailInfo))
def test_failure_reply(ca: CertAndKey, client_key: CryptoKeyHandle, info: FailInfo) -> None:
    req, parsed, _ = _request(ca, client_key)
    body = make_cert_rep(parsed, ca, status=2, fail_info=int(info), fail_text="policy says no")
    with pytest.raises(ScepFailure) as err:
        m.parse_cert_rep(body, req, trusted=[ca.cert], handle=client_key)
    assert err.value.fail_info is info
    assert err.value.hresult == info.hresult
    assert "policy says no" in err.value.message and "FAILURE" in err.value.message


def test_failure_without_failinfo(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    req, parsed, _ = _request(ca, client_key)
    with pytest.raises(ScepFailure) as err:
        m.parse_cert_rep(make_cert_rep(parsed, ca, status=2), req, trusted=[ca.cert],
                         handle=client_key)
    assert err.value.fail_info is None and err.value.hresult == HResult.E_FAIL


# Every check, one crafted reply each: (overrides for make_cert_rep, hresult, text).
HOSTILE: list[tuple[str, dict[str, Any], int, str]] = [
    ("message type", {"message_type": "19"}, HResult.CRYPT_E_UNEXPECTED_MSG_TYPE,
     "not CertRep"),
    ("transaction id", {"transaction_id": "0" * 40}, HResult.CRYPT_E_NO_MATCH,
     "is for transaction"),
    ("recipient nonce", {"recipient_nonce": b"\x01" * 16}, HResult.NTE_BAD_DATA,
     "recipientNonce"),
    ("no recipient nonce", {"omit": (m.OID_RECIPIENT_NONCE,)},
     HResult.CRYPT_E_AUTH_ATTR_MISSING, "no recipientNonce"),
    ("no status", {"omit": (m.OID_PKI_STATUS,)}, HResult.CRYPT_E_AUTH_ATTR_MISSING,
     "no pkiStatus"),
    ("no message type", {"omit": (m.OID_MESSAGE_TYPE,)}, HResult.CRYPT_E_AUTH_ATTR_MISSING,
     "no messageType"),
    ("no transaction id", {"omit": (m.OID_TRANSACTION_ID,)},
     HResult.CRYPT_E_AUTH_ATTR_MISSING, "no transactionID"),
    ("unknown status", {"status": 7, "content": b""}, HResult.CRYPT_E_BAD_MSG,
     "unknown pkiStatus"),
    ("garbage envelope", {"content": b"\x30\x03\x02\x01\x00"}, HResult.CRYPT_E_ASN1_BADTAG,
     "pkcsPKIEnvelope"),
    ("no envelope", {"content": b""}, HResult.CRYPT_E_ASN1_EOD, "empty"),
]


@pytest.mark.parametrize(("name", "overrides", "hresult", "text"), HOSTILE,
                         ids=[h[0] for h in HOSTILE])
def test_hostile_reply_fields(ca: CertAndKey, client_key: CryptoKeyHandle, name: str,
                              overrides: dict[str, Any], hresult: int, text: str) -> None:
    req, parsed, csr = _request(ca, client_key)
    body = make_cert_rep(parsed, ca, certs=(issue_from_csr(csr, ca),), **overrides)
    with pytest.raises(PeerError) as err:
        m.parse_cert_rep(body, req, trusted=[ca.cert], handle=client_key,
                         expected_key=client_key.public_key())
    assert err.value.hresult == hresult, err.value.message
    assert text in err.value.message


def test_reply_signed_by_another_ca(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    req, parsed, csr = _request(ca, client_key)
    other = make_ca("Other CA")
    with pytest.raises(PeerError) as err:
        m.parse_cert_rep(make_cert_rep(parsed, other, certs=(issue_from_csr(csr, other),)),
                         req, trusted=[ca.cert], handle=client_key)
    assert err.value.hresult == HResult.CRYPT_E_SIGNER_NOT_FOUND


def test_certificate_for_another_key_is_refused(ca: CertAndKey,
                                                client_key: CryptoKeyHandle) -> None:
    req, parsed, csr = _request(ca, client_key)
    stranger = CryptoKeyHandle.rsa().public_key()
    body = make_cert_rep(parsed, ca, certs=(issue_from_csr(csr, ca, public_key=stranger),))
    with pytest.raises(PeerError) as err:
        m.parse_cert_rep(body, req, trusted=[ca.cert], handle=client_key,
                         expected_key=client_key.public_key())
    assert err.value.hresult == HResult.CRYPT_E_NOT_FOUND
    assert "no certificate for our public key" in err.value.message


def test_reply_encrypted_to_someone_else(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    req, parsed, csr = _request(ca, client_key)
    other = make_cert("someone")
    redirected = ParsedRequest(**{**parsed.__dict__, "signer": other.cert})
    body = make_cert_rep(redirected, ca, certs=(issue_from_csr(csr, ca),))
    with pytest.raises(PeerError) as err:
        m.parse_cert_rep(body, req, trusted=[ca.cert], handle=client_key)
    assert err.value.hresult == HResult.CRYPT_E_RECIPIENT_NOT_FOUND


def test_cert_poll(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    req, _, _ = _request(ca, client_key)
    poll = m.cert_poll(req, handle=client_key, ca_cert=ca.cert, recipient=ca.cert, now=NOW)
    parsed = parse_request(poll.der, ca)
    assert parsed.message_type == 20
    assert parsed.transaction_id == req.transaction_id
    assert parsed.sender_nonce != req.sender_nonce
    assert as_certificate(parsed.signer) == req.signer_cert  # same transient certificate
    ias = m.IssuerAndSubject.load(parsed.message_data)
    assert ias["issuer"].dump() == ca.cert.subject.public_bytes()
    assert ias["subject"].dump() == req.subject_der


@pytest.mark.parametrize(("builder", "mtype"), [(m.get_cert, 21), (m.get_crl, 22)])
def test_get_cert_and_get_crl(ca: CertAndKey, client_key: CryptoKeyHandle, builder: Any,
                              mtype: int) -> None:
    mine = make_cert("mine", issuer=ca, key=client_key)
    req = builder(ca.cert.subject, 0x1234, handle=client_key, signer_cert=mine.cert,
                  recipient=ca.cert, algorithms=AES_SHA256, now=NOW)
    parsed = parse_request(req.der, ca)
    assert parsed.message_type == mtype
    ias = acms.IssuerAndSerialNumber.load(parsed.message_data)
    assert ias["serial_number"].native == 0x1234
    assert ias["issuer"].dump() == ca.cert.subject.public_bytes()


def test_renewal_req(ca: CertAndKey) -> None:
    old_key, new_key = CryptoKeyHandle.rsa(), CryptoKeyHandle.rsa()
    old = make_cert("dev1", issuer=ca, key=old_key)
    csr = build_csr(CsrRequest(subject="CN=dev1"), new_key)
    req = m.renewal_req(csr, old_handle=old_key, old_cert=old.cert, recipient=ca.cert,
                        algorithms=AES_SHA256, now=NOW)
    parsed = parse_request(req.der, ca)
    assert parsed.message_type == 17
    assert parsed.signer == old.cert
    assert parsed.transaction_id == m.transaction_id_for(new_key.public_key())
    issued = issue_from_csr(csr, ca)
    rep = m.parse_cert_rep(make_cert_rep(parsed, ca, certs=(issued,)), req, trusted=[ca.cert],
                           handle=old_key, expected_key=new_key.public_key())
    assert rep.issued == as_certificate(issued)
    assert old_key.decrypt_calls >= 1 and new_key.decrypt_calls == 0


def test_renewal_req_refuses_mismatched_cert(ca: CertAndKey) -> None:
    key = CryptoKeyHandle.rsa()
    other = make_cert("x", issuer=ca)
    with pytest.raises(ValueError, match="not for the key"):
        m.renewal_req(build_csr(CsrRequest(subject="CN=x"), key), old_handle=key,
                      old_cert=other.cert, recipient=ca.cert, algorithms=AES_SHA256, now=NOW)


def test_pkcs_req_refuses_foreign_csr(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    csr = build_csr(CsrRequest(subject="CN=x"), CryptoKeyHandle.rsa())
    with pytest.raises(ValueError, match="not for the key"):
        m.pkcs_req(csr, handle=client_key, recipient=ca.cert, algorithms=AES_SHA256, now=NOW)


def test_issued_chain_order_does_not_matter(ca: CertAndKey, client_key: CryptoKeyHandle) -> None:
    req, parsed, csr = _request(ca, client_key)
    issued = issue_from_csr(csr, ca)
    for certs in ((issued, ca.cert), (ca.cert, issued)):
        rep = m.parse_cert_rep(make_cert_rep(parsed, ca, certs=certs), req, trusted=[ca.cert],
                               handle=client_key, expected_key=client_key.public_key())
        assert rep.issued == as_certificate(issued) and rep.chain == (as_certificate(ca.cert),)
    assert isinstance(rep.issued, Certificate)
