"""The CA side of the SCEP message layer (RFC 8894 §3), sans-IO: bytes in, objects out.

`parse_pki_message` takes a PKIOperation body and the CA/RA decryption keys and returns a
`ScepRequest` whose signature, message digest and envelope were all checked, or raises:

- `MalformedRequest` when the body is not a SCEP pkiMessage we can answer at all (no
  transactionID / senderNonce to put in a CertRep): the HTTP layer answers 400;
- `RequestRefused(fail_info, text, header)` when it is one but fails a check: the caller
  answers a CertRep FAILURE with that failInfo (§3.3.2.2): badAlg for an algorithm we do not
  implement, badMessageCheck for a signature, digest or envelope that does not check out,
  badRequest for message data that makes no sense.

`build_cert_rep` makes the CertRep (§3.3.2): signed by the CA (or NDES's RA signing
certificate) with the request's digest, SUCCESS carrying a degenerate certs-only SignedData
enveloped to the requester's signing certificate with the request's cipher; FAILURE and
PENDING carry no content. The agent's CMS primitives (`agent.scep.cms`) do the building and
checking; this module decides what goes where.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from asn1crypto import algos, cms, core, parser
from asn1crypto import x509 as ax509
from cryptography import x509

from agent.diagnostics import FailInfo, HResult
from agent.errors import PeerError
from agent.scep import cms as scms
from agent.scep.capabilities import ContentCipher
from agent.scep.messages import (
    OID_FAIL_INFO,
    OID_FAIL_INFO_TEXT,
    OID_MESSAGE_TYPE,
    OID_PKI_STATUS,
    OID_RECIPIENT_NONCE,
    OID_SENDER_NONCE,
    OID_TRANSACTION_ID,
    IssuerAndSubject,
    MessageType,
    PkiStatus,
)
from keystores.base import HashAlg, KeyHandle

OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
NONCE_SIZE = 16

CT_CA_CERT = "application/x-x509-ca-cert"
CT_CA_RA_CERT = "application/x-x509-ca-ra-cert"
CT_PKI_MESSAGE = "application/x-pki-message"

_CIPHERS = {"des": ContentCipher.DES, "tripledes_3key": ContentCipher.DES3,
            "aes128_cbc": ContentCipher.AES128, "aes192_cbc": ContentCipher.AES192,
            "aes256_cbc": ContentCipher.AES256}
_DIGESTS = {"sha1": HashAlg.SHA1, "sha256": HashAlg.SHA256, "sha384": HashAlg.SHA384,
            "sha512": HashAlg.SHA512}
# HRESULTs of the agent's CMS layer that mean "an algorithm we do not implement".
_ALG_HRESULTS = {HResult.NTE_BAD_ALGID, HResult.CRYPT_E_UNKNOWN_ALGO}

FAIL_NAMES = {FailInfo.BAD_ALG: "badAlg", FailInfo.BAD_MESSAGE_CHECK: "badMessageCheck",
              FailInfo.BAD_REQUEST: "badRequest", FailInfo.BAD_TIME: "badTime",
              FailInfo.BAD_CERT_ID: "badCertId"}
MESSAGE_NAMES = {MessageType.PKCS_REQ: "PKCSReq", MessageType.RENEWAL_REQ: "RenewalReq",
                 MessageType.CERT_POLL: "CertPoll", MessageType.GET_CERT: "GetCert",
                 MessageType.GET_CRL: "GetCRL", MessageType.CERT_REP: "CertRep"}


def message_name(message_type: int) -> str:
    try:
        return MESSAGE_NAMES[MessageType(message_type)]
    except ValueError:
        return f"messageType {message_type}"


@dataclass(frozen=True)
class RequestHeader:
    """What a reply needs, known as soon as the signed attributes are read."""

    transaction_id: str
    sender_nonce: bytes
    message_type: int
    digest_alg: HashAlg = HashAlg.SHA256
    signer_cert: x509.Certificate | None = None


@dataclass(frozen=True)
class ScepRequest:
    header: RequestHeader
    signer_cert: x509.Certificate
    cipher: ContentCipher
    signing_time: datetime | None
    message_data: bytes
    decrypted_by: x509.Certificate  # which CA/RA certificate the envelope was for
    # CertPoll: IssuerAndSubject; GetCert/GetCRL: IssuerAndSerialNumber (names as DER).
    issuer_der: bytes = b""
    subject_der: bytes = b""
    serial: int | None = None

    @property
    def message_type(self) -> MessageType:
        return MessageType(self.header.message_type)

    @property
    def transaction_id(self) -> str:
        return self.header.transaction_id

    @property
    def requester(self) -> str:
        return self.signer_cert.subject.rfc4514_string()


class MalformedRequest(Exception):
    """Not an answerable pkiMessage (HTTP 400)."""


class RequestRefused(Exception):
    """A pkiMessage that fails a check: answer CertRep FAILURE with `fail_info`."""

    def __init__(self, fail_info: FailInfo, text: str, header: RequestHeader) -> None:
        super().__init__(f"{FAIL_NAMES[fail_info]}: {text}")
        self.fail_info = fail_info
        self.text = text
        self.header = header


Decrypter = tuple[x509.Certificate, KeyHandle]


def _string_attr(value: core.Asn1Value) -> str | None:
    for spec in (core.PrintableString, core.UTF8String, core.IA5String):
        try:
            text = scms.as_type(value, spec).native
        except (ValueError, TypeError):
            continue
        if isinstance(text, str):
            return text
    return None


def _octets_attr(value: core.Asn1Value) -> bytes | None:
    try:
        out = scms.as_type(value, core.OctetString).native
    except (ValueError, TypeError):
        return None
    return out if isinstance(out, bytes) else None


def _signing_time(value: core.Asn1Value | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = scms.as_type(value, cms.Time).native
    except (ValueError, TypeError):
        return None
    if isinstance(when, datetime):
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def _sid_matches(sid: cms.SignerIdentifier, cert: ax509.Certificate) -> bool:
    """RFC 5652 §5.3: the signer is named by issuer + serial or by subject key identifier."""
    if sid.name == "issuer_and_serial_number":
        ias = sid.chosen
        return bool(ias["issuer"] == cert.issuer
                    and ias["serial_number"].native == cert.serial_number)
    ski = cert.key_identifier
    return ski is not None and sid.chosen.native == ski


def read_header(body: bytes) -> tuple[RequestHeader, cms.SignedData]:
    """The SCEP attributes of a pkiMessage, before anything is verified."""
    try:
        info = scms.load_content_info(body, "the pkiMessage")
    except PeerError as exc:
        raise MalformedRequest(f"not a CMS message: {exc.message}") from None
    try:
        if info["content_type"].native != "signed_data":
            raise MalformedRequest(f"the pkiMessage is a {info['content_type'].native}, "
                                   "not signedData")
        signed = info["content"]
        infos = list(signed["signer_infos"])
        if len(infos) != 1:
            raise MalformedRequest(f"the pkiMessage has {len(infos)} signers, SCEP needs one")
        si = infos[0]
        attrs: dict[str, core.Asn1Value] = {}
        for attr in si["signed_attrs"]:
            values = attr["values"]
            if len(values):
                attrs[attr["type"].dotted] = values[0]
        digest_name = si["digest_algorithm"]["algorithm"].native
        certs = [c.chosen for c in signed["certificates"] or [] if c.name == "certificate"]
        sid = si["sid"]
        signer_der = next((c.dump() for c in certs if _sid_matches(sid, c)), None)
    except MalformedRequest:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise MalformedRequest(f"the pkiMessage is not valid DER/BER: {exc}") from None
    mtype_text = _string_attr(attrs[OID_MESSAGE_TYPE]) if OID_MESSAGE_TYPE in attrs else None
    tid = _string_attr(attrs[OID_TRANSACTION_ID]) if OID_TRANSACTION_ID in attrs else None
    nonce = _octets_attr(attrs[OID_SENDER_NONCE]) if OID_SENDER_NONCE in attrs else None
    if mtype_text is None or not mtype_text.strip().isdigit():
        raise MalformedRequest("the pkiMessage has no (numeric) messageType attribute")
    if not tid:
        raise MalformedRequest("the pkiMessage has no transactionID attribute")
    if nonce is None:
        raise MalformedRequest("the pkiMessage has no senderNonce attribute")
    signer = None
    if signer_der is not None:
        try:
            signer = x509.load_der_x509_certificate(signer_der)
        except ValueError:
            signer = None
    header = RequestHeader(tid, nonce, int(mtype_text), _DIGESTS.get(digest_name,
                                                                      HashAlg.SHA256), signer)
    if digest_name not in _DIGESTS:
        raise RequestRefused(FailInfo.BAD_ALG, f"digest algorithm {digest_name} is not "
                             "supported (SHA-1, SHA-256, SHA-384, SHA-512 are)", header)
    return header, signed


def peek_message_type(body: bytes) -> int | None:
    """The messageType of a pkiMessage, unverified (to route faults per operation)."""
    try:
        return read_header(body)[0].message_type
    except (MalformedRequest, RequestRefused):
        return None


def envelope_cipher(enveloped: bytes) -> ContentCipher:
    """The content cipher of an EnvelopedData, read at the TLV level (BER tolerated)."""
    info = scms.load_content_info(enveloped, "the pkcsPKIEnvelope")
    with scms.asn1_errors("the pkcsPKIEnvelope"):
        if info["content_type"].native != "enveloped_data":
            raise PeerError("the pkcsPKIEnvelope is not envelopedData",
                            hresult=HResult.CRYPT_E_INVALID_MSG_TYPE)
        # Walk the EncryptedContentInfo's TLVs: Go clients encode its [0] encryptedContent
        # as a constructed (BER) string, which asn1crypto's field access refuses.
        eci = info["content"]["encrypted_content_info"].contents
        _, _, _, header, contents, trailer = parser.parse(eci)  # contentType
        second = eci[len(header) + len(contents) + len(trailer):]
        _, _, _, header, contents, trailer = parser.parse(second)
        alg = algos.EncryptionAlgorithm.load(header + contents + trailer)
        name = alg["algorithm"].native
        if name not in _CIPHERS:
            raise PeerError(f"content encryption {alg['algorithm'].dotted} ({name}) is not "
                            "supported", hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
        return _CIPHERS[name]


def _refuse_from(exc: PeerError, header: RequestHeader, what: str) -> RequestRefused:
    fail = FailInfo.BAD_ALG if exc.hresult in _ALG_HRESULTS else FailInfo.BAD_MESSAGE_CHECK
    return RequestRefused(fail, f"{what}: {exc.message}", header)


def parse_pki_message(body: bytes, decrypters: Sequence[Decrypter]) -> ScepRequest:
    """Verify and open a PKIOperation request (RFC 8894 §3.2, §3.3)."""
    header, _signed = read_header(body)
    if header.signer_cert is None:
        raise RequestRefused(FailInfo.BAD_MESSAGE_CHECK, "the signer's certificate is not in "
                             "the message (RFC 8894 §3.2.2 requires it)", header)
    try:
        verified = scms.verify_signed_data(body, [header.signer_cert], "the pkiMessage")
    except PeerError as exc:
        raise _refuse_from(exc, header, "signature check failed") from None
    signing_time = _signing_time(verified.attributes.get(OID_SIGNING_TIME))
    try:
        mtype = MessageType(header.message_type)
    except ValueError:
        raise RequestRefused(FailInfo.BAD_REQUEST, f"messageType {header.message_type} is "
                             "not a SCEP request", header) from None
    if mtype is MessageType.CERT_REP:
        raise RequestRefused(FailInfo.BAD_REQUEST, "a CertRep is not a request", header)
    try:
        cipher = envelope_cipher(verified.content)
    except PeerError as exc:
        raise _refuse_from(exc, header, "the pkcsPKIEnvelope") from None
    data: bytes | None = None
    last: PeerError | None = None
    decrypted_by = None
    for cert, handle in decrypters:
        try:
            data = scms.open_envelope(verified.content, handle, cert)
        except PeerError as exc:
            last = exc
            continue
        decrypted_by = cert
        break
    if data is None or decrypted_by is None:
        assert last is not None
        if last.hresult == HResult.CRYPT_E_RECIPIENT_NOT_FOUND:
            names = ", ".join(c.subject.rfc4514_string() for c, _ in decrypters)
            raise RequestRefused(FailInfo.BAD_MESSAGE_CHECK, "the pkcsPKIEnvelope is not "
                                 f"encrypted to this CA's encryption certificate ({names})",
                                 header)
        raise _refuse_from(last, header, "cannot open the pkcsPKIEnvelope")
    request = ScepRequest(header, header.signer_cert, cipher, signing_time, data, decrypted_by)
    if mtype is MessageType.CERT_POLL:
        try:
            ias = IssuerAndSubject.load(data)
            issuer = ias["issuer"].dump(force=True)
            subject = ias["subject"].dump(force=True)
            _ = ias["issuer"].native, ias["subject"].native
        except (ValueError, TypeError, KeyError) as exc:
            raise RequestRefused(FailInfo.BAD_REQUEST, f"CertPoll data is not "
                                 f"IssuerAndSubject: {exc}", header) from None
        return replace(request, issuer_der=issuer, subject_der=subject)
    if mtype in (MessageType.GET_CERT, MessageType.GET_CRL):
        try:
            isn = cms.IssuerAndSerialNumber.load(data)
            issuer = isn["issuer"].dump(force=True)
            _ = isn["issuer"].native
            serial = int(isn["serial_number"].native)
        except (ValueError, TypeError, KeyError) as exc:
            raise RequestRefused(FailInfo.BAD_REQUEST, f"{MESSAGE_NAMES[mtype]} data is not "
                                 f"IssuerAndSerialNumber: {exc}", header) from None
        return replace(request, issuer_der=issuer, serial=serial)
    return request


def same_name(der: bytes, name: x509.Name) -> bool:
    """X.500 name equality as RFC 5280 §7.1 compares (asn1crypto normalises case/space)."""
    try:
        return bool(ax509.Name.load(der) == ax509.Name.load(name.public_bytes()))
    except (ValueError, TypeError):
        return False


def name_text(der: bytes) -> str:
    try:
        return str(ax509.Name.load(der).human_friendly)
    except (ValueError, TypeError):
        return der.hex()


# --- replies ---------------------------------------------------------------------------------

def sign_message(content: bytes | None, *, signer_cert: x509.Certificate, handle: KeyHandle,
                 digest_alg: HashAlg, attributes: Sequence[cms.CMSAttribute],
                 signing_time: datetime | None = None) -> bytes:
    """A SignedData like `agent.scep.cms.sign_data`, but with the eContent *absent* when
    `content` is None: RFC 8894 §3.3.2 says a FAILURE or PENDING CertRep has no
    pkcsPKIEnvelope, and the messageDigest is then over the empty string."""
    if content is not None:
        return scms.sign_data(content, signer_cert=signer_cert, handle=handle,
                              digest_alg=digest_alg, attributes=attributes,
                              signing_time=signing_time)
    signer = scms.to_asn1_cert(signer_cert)
    attrs = [scms.attribute(OID_CONTENT_TYPE, cms.ContentType("data")),
             scms.attribute(OID_MESSAGE_DIGEST, core.OctetString(scms.digest(b"",
                                                                              digest_alg)))]
    if signing_time is not None:
        attrs.append(scms.attribute(OID_SIGNING_TIME, cms.Time({"utc_time": signing_time})))
    attrs.extend(attributes)
    attrs.sort(key=lambda a: a.dump())
    signed_attrs = cms.CMSAttributes(attrs)
    signature = handle.sign(signed_attrs.dump(), digest_alg)
    digest_algo = algos.DigestAlgorithm({"algorithm": digest_alg.value})
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": signer["tbs_certificate"]["issuer"],
            "serial_number": signer["tbs_certificate"]["serial_number"]})}),
        "digest_algorithm": digest_algo,
        "signed_attrs": signed_attrs,
        "signature_algorithm": scms.signature_algorithm_for(handle, digest_alg),
        "signature": signature,
    })
    signed = cms.SignedData({
        "version": "v1", "digest_algorithms": [digest_algo],
        "encap_content_info": {"content_type": "data"},
        "certificates": [signer], "signer_infos": [signer_info],
    })
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())


@dataclass(frozen=True)
class ReplySigner:
    cert: x509.Certificate
    handle: KeyHandle


def build_cert_rep(header: RequestHeader, status: PkiStatus, *, signer: ReplySigner,
                   now: datetime, fail_info: FailInfo | None = None, fail_text: str = "",
                   certs: Sequence[x509.Certificate] = (), crls: Sequence[bytes] = (),
                   recipient: x509.Certificate | None = None,
                   cipher: ContentCipher = ContentCipher.DES3,
                   rand: scms.RandomBytes = os.urandom) -> bytes:
    """A CertRep answering `header` (RFC 8894 §3.3.2)."""
    attrs = [
        scms.attribute(OID_MESSAGE_TYPE, core.PrintableString(str(int(MessageType.CERT_REP)))),
        scms.attribute(OID_PKI_STATUS, core.PrintableString(str(int(status)))),
        scms.attribute(OID_TRANSACTION_ID, core.PrintableString(header.transaction_id)),
        scms.attribute(OID_SENDER_NONCE, core.OctetString(rand(NONCE_SIZE))),
        scms.attribute(OID_RECIPIENT_NONCE, core.OctetString(header.sender_nonce)),
    ]
    content: bytes | None = None
    if status is PkiStatus.FAILURE:
        if fail_info is None:
            raise ValueError("a FAILURE CertRep needs a failInfo")
        attrs.append(scms.attribute(OID_FAIL_INFO, core.PrintableString(str(int(fail_info)))))
        if fail_text:
            attrs.append(scms.attribute(OID_FAIL_INFO_TEXT, core.UTF8String(fail_text[:512])))
    elif status is PkiStatus.SUCCESS:
        if recipient is None:
            raise ValueError("a SUCCESS CertRep is encrypted to the requester's certificate")
        inner = scms.degenerate_certs_only(list(certs), list(crls))
        content = scms.envelope(inner, recipient, cipher, rand)
    return sign_message(content, signer_cert=signer.cert, handle=signer.handle,
                        digest_alg=header.digest_alg, attributes=attrs, signing_time=now)


# --- GetCACert / GetCACaps -----------------------------------------------------------------

def ca_cert_reply(ca: x509.Certificate, ra: Sequence[x509.Certificate] = ()) -> tuple[str, bytes]:
    """GetCACert (RFC 8894 §4.2.1): the CA certificate alone, or with RA certificates a
    degenerate certs-only PKCS#7 (NDES sends its RA signing and encryption certificates
    first, then the CA)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    if not ra:
        return CT_CA_CERT, ca.public_bytes(Encoding.DER)
    return CT_CA_RA_CERT, scms.degenerate_certs_only([*ra, ca])


def caps_reply(caps: Sequence[str]) -> bytes:
    """GetCACaps (§3.5.2): one keyword per line (LF-separated)."""
    return "\n".join(caps).encode() + b"\n"


def cipher_allowed(cipher: ContentCipher, caps: Sequence[str]) -> bool:
    lower = {c.lower() for c in caps}
    if cipher in (ContentCipher.AES128, ContentCipher.AES192, ContentCipher.AES256):
        return "aes" in lower or "scepstandard" in lower
    if cipher is ContentCipher.DES3:
        return "des3" in lower
    return False  # single DES is never advertised


def digest_allowed(digest: HashAlg, caps: Sequence[str]) -> bool:
    lower = {c.lower() for c in caps}
    if digest is HashAlg.SHA256 and "scepstandard" in lower:
        return True
    name = {HashAlg.SHA1: "sha-1", HashAlg.SHA256: "sha-256", HashAlg.SHA384: "sha-384",
            HashAlg.SHA512: "sha-512"}[digest]
    return name in lower
