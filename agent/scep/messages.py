"""SCEP pkiMessages (RFC 8894 §3): build the requests, parse and check CertRep. Sans-IO.

A request is a SignedData (signed by our key, through its handle) whose content is an
EnvelopedData (encrypted to the CA/RA) holding the message data: a PKCS#10 for PKCSReq and
RenewalReq, IssuerAndSubject for CertPoll, IssuerAndSerialNumber for GetCert and GetCRL.
The reply, CertRep, is checked completely before anything in it is believed: signature by a
CA/RA certificate from GetCACert, messageType, transactionID, recipientNonce, messageDigest;
then its envelope is opened with our key and, on SUCCESS, the issued certificate must carry
our public key.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.diagnostics import FailInfo, HResult
from agent.errors import PeerError
from agent.scep import ber, der
from agent.scep import cms as scms
from agent.scep.capabilities import Algorithms
from agent.scep.certificate import Certificate, as_certificate
from agent.scep.cmsread import certs_from_degenerate, open_envelope, verify_signed_data
from agent.scep.errors import ScepFailure
from keystores.base import HashAlg, KeyAlgorithm, KeyHandle, PublicKey

# RFC 8894 §3.2.1: the SCEP authenticated attributes (arc 2.16.840.1.113733.1.9).
OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_PKI_STATUS = "2.16.840.1.113733.1.9.3"
OID_FAIL_INFO = "2.16.840.1.113733.1.9.4"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"  # RFC 8894 §3.2.1.4.5 id-scep-failInfoText

NONCE_SIZE = 16


class MessageType(enum.IntEnum):
    """RFC 8894 §3.2.1.2 messageType values."""

    CERT_REP = 3
    RENEWAL_REQ = 17
    PKCS_REQ = 19
    CERT_POLL = 20  # GetCertInitial in older drafts
    GET_CERT = 21
    GET_CRL = 22


class PkiStatus(enum.IntEnum):
    """RFC 8894 §3.2.1.3 pkiStatus values."""

    SUCCESS = 0
    FAILURE = 2
    PENDING = 3


if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from agent.scep.asn1types import IssuerAndSubject
    from agent.scep.certificate import CertificateLike


def __getattr__(name: str) -> Any:
    """`IssuerAndSubject` (an asn1crypto schema, for the lab CA) is imported on first use."""
    if name == "IssuerAndSubject":
        from agent.scep.asn1types import IssuerAndSubject

        return IssuerAndSubject
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def transaction_id_for(public_key: PublicKey) -> str:
    """RFC 8894 §3.2.1.1: a hash of the request's public key, here SHA-1 in lower-case hex.

    SHA-1 over the subjectPublicKey bits (RFC 5280 §4.2.1.2 method 1) gives the 40 hex
    digits the Windows client's transaction ids show (NDES connector logs); the same key
    always yields the same id, which lets a CA match a CertPoll to its PKCSReq.
    """
    spki = ber.sequence(ber.one_element(public_key_der(public_key)), "SubjectPublicKeyInfo")
    bits = ber.expect(spki[1], ber.BIT_STRING, "subjectPublicKey")
    return scms.digest(bits[1:], HashAlg.SHA1).hex()


def public_key_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert_signature_algorithm(handle: KeyHandle) -> bytes:
    if handle.spec.algorithm is KeyAlgorithm.EC:
        return der.algorithm("1.2.840.10045.4.3.2", None)  # ecdsa-with-SHA256
    return der.algorithm("1.2.840.113549.1.1.11")  # sha256WithRSAEncryption


_TRANSIENT_NAME = der.seq(der.tlv(0x31, der.seq(der.oid("2.5.4.3"),
                                                der.utf8_string("SCEP transient certificate"))))


def transient_certificate(handle: KeyHandle, subject_der: bytes, now: datetime,
                          serial: int | None = None) -> Certificate:
    """The self-signed certificate that signs a PKCSReq (RFC 8894 §2.3).

    The requester has no certificate yet, so it signs with a throw-away certificate for the
    request key; the CA encrypts its CertRep to this certificate. Subject = the CSR subject.
    Signed through the handle with SHA-256 whatever the SCEP digest is.
    """
    if serial is None:
        serial = int.from_bytes(os.urandom(16), "big") >> 1 or 1
    name = subject_der if subject_der not in (b"", b"\x30\x00") else _TRANSIENT_NAME
    start = (now - timedelta(minutes=5)).replace(microsecond=0)
    alg = _cert_signature_algorithm(handle)
    tbs = der.seq(
        der.explicit(0, der.integer(2)),  # v3
        der.integer(serial), alg, name,
        der.seq(der.time(start), der.time(start + timedelta(days=7))),
        name, public_key_der(handle.public_key()),
        der.explicit(3, der.seq(  # basicConstraints, critical, cA FALSE (empty SEQUENCE)
            der.seq(der.oid("2.5.29.19"), der.TRUE, der.octet_string(der.seq())))))
    signature = handle.sign(tbs, HashAlg.SHA256)
    return Certificate(der.seq(tbs, alg, der.bit_string(signature)))


@dataclass(frozen=True)
class PendingRequest:
    """A request as sent: what is needed to check its reply (and to poll for it)."""

    message_type: MessageType
    transaction_id: str
    sender_nonce: bytes
    signer_cert: Certificate  # the reply is encrypted to this certificate
    algorithms: Algorithms
    der: bytes = field(repr=False)
    subject_der: bytes = field(default=b"", repr=False)  # CSR subject, for CertPoll


def build_pki_message(message_type: MessageType, message_data: bytes, *, handle: KeyHandle,
                      signer_cert: CertificateLike, recipient: CertificateLike,
                      algorithms: Algorithms, transaction_id: str, now: datetime,
                      sender_nonce: bytes | None = None, subject_der: bytes = b"",
                      rand: scms.RandomBytes = os.urandom) -> PendingRequest:
    """Envelope `message_data` to `recipient`, then sign with the SCEP attributes (§3.2)."""
    nonce = sender_nonce if sender_nonce is not None else rand(NONCE_SIZE)
    signer = as_certificate(signer_cert)
    enveloped = scms.envelope(message_data, recipient, algorithms.cipher, rand)
    attrs = [
        scms.encode_attribute(OID_MESSAGE_TYPE, der.printable_string(str(int(message_type)))),
        scms.encode_attribute(OID_TRANSACTION_ID, der.printable_string(transaction_id)),
        scms.encode_attribute(OID_SENDER_NONCE, der.octet_string(nonce)),
    ]
    signed = scms.sign_data(enveloped, signer_cert=signer, handle=handle,
                            digest_alg=algorithms.digest, attributes=attrs, signing_time=now)
    return PendingRequest(message_type, transaction_id, nonce, signer, algorithms, signed,
                          subject_der)


def _csr_parts(csr_der: bytes) -> tuple[bytes, bytes]:
    """(subject DER, SubjectPublicKeyInfo DER) of our own CSR (RFC 2986 §4)."""
    request = ber.sequence(ber.one_element(csr_der), "CertificationRequest")
    info = ber.sequence(request[0], "CertificationRequestInfo")  # version, subject, spki, ...
    if len(info) < 3:
        raise ValueError("CertificationRequestInfo is incomplete")
    return info[1][4], info[2][4]


def pkcs_req(csr_der: bytes, *, handle: KeyHandle, recipient: CertificateLike,
             algorithms: Algorithms, now: datetime,
             rand: scms.RandomBytes = os.urandom) -> PendingRequest:
    """PKCSReq (19), signed with a transient self-signed certificate for the request key."""
    subject_der, spki = _csr_parts(csr_der)
    if spki != public_key_der(handle.public_key()):
        raise ValueError("the CSR is not for the key that signs the PKCSReq")
    signer = transient_certificate(handle, subject_der, now)
    return build_pki_message(MessageType.PKCS_REQ, csr_der, handle=handle, signer_cert=signer,
                             recipient=recipient, algorithms=algorithms,
                             transaction_id=transaction_id_for(handle.public_key()), now=now,
                             subject_der=subject_der, rand=rand)


def renewal_req(csr_der: bytes, *, old_handle: KeyHandle, old_cert: CertificateLike,
                recipient: CertificateLike, algorithms: Algorithms, now: datetime,
                rand: scms.RandomBytes = os.urandom,
                message_type: MessageType = MessageType.RENEWAL_REQ) -> PendingRequest:
    """RenewalReq (17, RFC 8894 §3.3.1.2): signed with the existing certificate and its key.

    The CSR carries the new public key (or the same one when the key is reused); the
    transactionID is the hash of that requested key, and the CA encrypts its reply to the
    existing certificate, so `old_handle` decrypts it. With `message_type=PKCS_REQ` it is a
    PKCSReq signed with an existing certificate (§2.3), for CAs without Renewal.
    """
    if public_key_der(old_cert.public_key()) != public_key_der(old_handle.public_key()):
        raise ValueError("the certificate to renew is not for the key given with it")
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    subject_der, spki = _csr_parts(csr_der)
    new_key = load_der_public_key(spki)
    if not isinstance(new_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("the CSR holds neither an RSA nor an EC key")
    return build_pki_message(message_type, csr_der, handle=old_handle,
                             signer_cert=old_cert, recipient=recipient, algorithms=algorithms,
                             transaction_id=transaction_id_for(new_key),
                             now=now, subject_der=subject_der, rand=rand)


def cert_poll(pending: PendingRequest, *, handle: KeyHandle, ca_cert: CertificateLike,
              recipient: CertificateLike, now: datetime,
              rand: scms.RandomBytes = os.urandom) -> PendingRequest:
    """CertPoll (20, §3.3.3): same transactionID and signer as the pending request, new nonce.

    IssuerAndSubject names the issuing CA and the subject of our request.
    """
    data = der.seq(as_certificate(ca_cert).subject_der, pending.subject_der or der.seq())
    return build_pki_message(MessageType.CERT_POLL, data, handle=handle,
                             signer_cert=pending.signer_cert, recipient=recipient,
                             algorithms=pending.algorithms,
                             transaction_id=pending.transaction_id, now=now,
                             subject_der=pending.subject_der, rand=rand)


def _issuer_and_serial(issuer: bytes | x509.Name, serial: int) -> bytes:
    """`issuer`: the Name's DER, or cryptography's Name."""
    name = issuer if isinstance(issuer, bytes) else issuer.public_bytes()
    return der.seq(name, der.integer(serial))


def get_cert(issuer: bytes | x509.Name, serial: int, *, handle: KeyHandle,
             signer_cert: CertificateLike, recipient: CertificateLike,
             algorithms: Algorithms, now: datetime,
             rand: scms.RandomBytes = os.urandom) -> PendingRequest:
    """GetCert (21, §3.3.4): ask for a certificate by issuer and serial number."""
    return build_pki_message(MessageType.GET_CERT, _issuer_and_serial(issuer, serial),
                             handle=handle, signer_cert=signer_cert, recipient=recipient,
                             algorithms=algorithms, transaction_id=rand(20).hex(), now=now,
                             rand=rand)


def get_crl(issuer: bytes | x509.Name, serial: int, *, handle: KeyHandle,
            signer_cert: CertificateLike, recipient: CertificateLike,
            algorithms: Algorithms, now: datetime,
            rand: scms.RandomBytes = os.urandom) -> PendingRequest:
    """GetCRL (22, §3.3.5): ask for the CRL covering the certificate issuer/serial."""
    return build_pki_message(MessageType.GET_CRL, _issuer_and_serial(issuer, serial),
                             handle=handle, signer_cert=signer_cert, recipient=recipient,
                             algorithms=algorithms, transaction_id=rand(20).hex(), now=now,
                             rand=rand)


# --- CertRep --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CertRep:
    """A CertRep whose signature, type, transaction and nonce have all been checked."""

    status: PkiStatus
    transaction_id: str
    recipient_nonce: bytes
    sender_nonce: bytes
    signer: Certificate
    digest_alg: HashAlg
    fail_info: FailInfo | None = None
    fail_text: str = ""
    issued: Certificate | None = None  # SUCCESS to an enrolment: the certificate for us
    certificates: tuple[Certificate, ...] = ()  # everything in the degenerate reply
    crls: tuple[bytes, ...] = ()

    @property
    def chain(self) -> tuple[Certificate, ...]:
        return tuple(c for c in self.certificates if c is not self.issued)


Attributes = dict[str, ber.Element]  # dotted OID -> the value (see VerifiedSignedData)


def _printable(attrs: Attributes, oid: str, name: str) -> str | None:
    """A PrintableString (RFC 8894 §3.2.1), UTF8String or IA5String attribute's text."""
    value = attrs.get(oid)
    if value is None:
        return None
    text = ber.read_string(value)
    if text is None:
        raise PeerError(f"the CertRep's {name} attribute is not a string",
                        hresult=HResult.CRYPT_E_BAD_MSG)
    return text


def _octets(attrs: Attributes, oid: str, name: str) -> bytes | None:
    value = attrs.get(oid)
    if value is None:
        return None
    try:
        return ber.read_octets(value)
    except ValueError:
        raise PeerError(f"the CertRep's {name} attribute is not an OCTET STRING",
                        hresult=HResult.CRYPT_E_BAD_MSG) from None


def _require(value: str | bytes | None, name: str) -> str | bytes:
    if value is None:
        raise PeerError(f"the CertRep has no {name} attribute (RFC 8894 §3.3.2)",
                        hresult=HResult.CRYPT_E_AUTH_ATTR_MISSING)
    return value


def parse_cert_rep(body: bytes, request: PendingRequest, *, trusted: Sequence[CertificateLike],
                   handle: KeyHandle, expected_key: PublicKey | None = None) -> CertRep:
    """Check a CertRep against the request it answers and open it (RFC 8894 §3.3.2).

    `trusted`: the CA/RA certificates from GetCACert that may sign CertReps. `handle`: the
    key of `request.signer_cert` (the reply is encrypted to it). `expected_key`: for
    enrolment replies, the public key the issued certificate must carry.
    """
    with scms.asn1_errors("the CertRep"):
        verified = verify_signed_data(body, trusted, "the CertRep")
        attrs = verified.raw_attributes
        mtype = _require(_printable(attrs, OID_MESSAGE_TYPE, "messageType"), "messageType")
        if mtype != str(int(MessageType.CERT_REP)):
            raise PeerError(f"the reply has messageType {mtype!r}, not CertRep (3)",
                            hresult=HResult.CRYPT_E_UNEXPECTED_MSG_TYPE)
        tid = str(_require(_printable(attrs, OID_TRANSACTION_ID, "transactionID"),
                           "transactionID"))
        if tid != request.transaction_id:
            raise PeerError(f"the CertRep is for transaction {tid!r}, ours is "
                            f"{request.transaction_id!r}", hresult=HResult.CRYPT_E_NO_MATCH,
                            advice="the reply belongs to another request")
        rnonce = _octets(attrs, OID_RECIPIENT_NONCE, "recipientNonce")
        if rnonce is None:
            _require(None, "recipientNonce")
            rnonce = b""
        if rnonce != request.sender_nonce:
            raise PeerError(f"the CertRep's recipientNonce {rnonce.hex()} is not our "
                            f"senderNonce {request.sender_nonce.hex()} (a replayed or "
                            "misrouted reply)", hresult=HResult.NTE_BAD_DATA)
        snonce = _octets(attrs, OID_SENDER_NONCE, "senderNonce") or b""
        status_text = _require(_printable(attrs, OID_PKI_STATUS, "pkiStatus"), "pkiStatus")
        try:
            status = PkiStatus(int(status_text))
        except ValueError:
            raise PeerError(f"the CertRep has an unknown pkiStatus {status_text!r}",
                            hresult=HResult.CRYPT_E_BAD_MSG) from None
        common = {"transaction_id": tid, "recipient_nonce": rnonce, "sender_nonce": snonce,
                  "signer": verified.signer, "digest_alg": verified.digest_alg}
        if status is PkiStatus.PENDING:
            return CertRep(PkiStatus.PENDING, **common)  # type: ignore[arg-type]
        if status is PkiStatus.FAILURE:
            raise _failure(attrs)
    inner = open_envelope(verified.content, handle, request.signer_cert,
                               "the CertRep's pkcsPKIEnvelope")
    certs, crls = certs_from_degenerate(inner, "the CertRep's degenerate certificates-only "
                                               "message")
    issued = None
    if expected_key is not None:
        issued = _issued_for(certs, expected_key)
    return CertRep(PkiStatus.SUCCESS, **common, issued=issued,  # type: ignore[arg-type]
                   certificates=tuple(certs), crls=tuple(crls))


def _failure(attrs: Attributes) -> ScepFailure:
    info_text = _printable(attrs, OID_FAIL_INFO, "failInfo")
    fail_text = _printable(attrs, OID_FAIL_INFO_TEXT, "failInfoText") or ""
    fail_info: FailInfo | None = None
    if info_text is not None:
        try:
            fail_info = FailInfo(int(info_text))
        except ValueError:
            fail_info = None
    names = {FailInfo.BAD_ALG: "badAlg", FailInfo.BAD_MESSAGE_CHECK: "badMessageCheck",
             FailInfo.BAD_REQUEST: "badRequest", FailInfo.BAD_TIME: "badTime",
             FailInfo.BAD_CERT_ID: "badCertId"}
    why = (f"{names[fail_info]} ({int(fail_info)})" if fail_info is not None
           else f"failInfo {info_text!r}" if info_text is not None else "no failInfo given")
    message = f"the SCEP server refused the request: FAILURE, {why}"
    if fail_text:
        message += f": {fail_text}"
    advice = {FailInfo.BAD_REQUEST: "check the challenge password and the request contents "
                                    "against the CA's policy",
              FailInfo.BAD_MESSAGE_CHECK: "the CA could not verify our signature",
              FailInfo.BAD_ALG: "the CA does not accept the algorithms we used; check GetCACaps",
              FailInfo.BAD_TIME: "check this device's clock",
              FailInfo.BAD_CERT_ID: "the CA does not know the certificate we referenced"}
    return ScepFailure(message, fail_info, fail_text=fail_text,
                       advice=advice.get(fail_info, "") if fail_info is not None else "")


def _reencoded_key(cert: Certificate) -> bytes | None:
    try:
        return public_key_der(cert.public_key())
    except (ValueError, TypeError):  # unsupported or malformed: not our key in any case
        return None


def _issued_for(certs: Sequence[Certificate], public_key: PublicKey) -> Certificate:
    """The certificate in the reply that carries our public key; refuse if there is none.

    A certificate for another key must never be installed: its private key is not ours.
    Windows' `certreq -accept` fails the same way with CRYPT_E_NOT_FOUND.
    """
    ours = public_key_der(public_key)
    for cert in certs:
        # the bytes as issued, else the key re-encoded (a CA may write the SPKI differently)
        if cert.spki_der == ours or _reencoded_key(cert) == ours:
            return cert
    subjects = "; ".join(c.subject for c in certs) or "none"
    raise PeerError(f"the CA returned no certificate for our public key (certificates in the "
                    f"reply: {subjects})", hresult=HResult.CRYPT_E_NOT_FOUND,
                    advice="nothing was installed; the CA issued a certificate for another key")


__all__ = ["CertRep", "IssuerAndSubject", "MessageType", "PendingRequest", "PkiStatus", "cert_poll",
           "get_cert", "get_crl", "parse_cert_rep", "pkcs_req", "renewal_req",
           "transaction_id_for", "transient_certificate"]
