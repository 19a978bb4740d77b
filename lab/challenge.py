"""Dynamic SCEP challenges like Intune's CertEnrollToken (sans-IO; the clock is passed in).

Intune delivers, per device per profile per delivery, a Challenge that is base64 of (seed 001):

    <CertEnrollToken><Data><CertEnrollChallenge>…</CertEnrollChallenge>
    <SignerThumbprint>…</SignerThumbprint></Data><Signature>hex</Signature>
    <DeviceID>…</DeviceID><CertificateRequestId>ModelName=AC_<acct>/LogicalName_<policy>;
    Version=1;Hash=<n></CertificateRequestId><Timestamp>…Z</Timestamp></CertEnrollToken>

and validates it when the CA forwards the CSR (seed 000: signature, expiry (one hour), profile
still targeted, CSR properties as expected). The lab's token has the same envelope. Inside:

- the *claims*: what the CSR must contain (subject (OID, value) pairs, SANs, key length, EKUs,
  key usage), the device, profile, node and request id, a 16-byte random nonce, a challenge id
  (the single-use key) and the validity window. JSON, UTF-8.
- `CertEnrollChallenge` = base64 of a blob: `P` + claims (plain), or — when the lab has a
  challenge encryption key — `E` + 12-byte nonce + AES-256-GCM(claims, aad=ENCRYPT_AAD), so the
  device cannot read what the validator expects (Intune's is a PKCS#7 EnvelopedData).
- `Signature` = hex of the lab signing key's signature over SIGN_CONTEXT + blob + thumbprint
  (ECDSA P-256/SHA-256 DER, or RSA PKCS#1 v1.5/SHA-256). Encrypt-then-sign, as Intune does
  ("signs the encrypted blob"): tampering is refused before anything is decrypted.
- `SignerThumbprint` = SHA-1 (hex, upper case) of the signing certificate, to pick the key.
- the outer `DeviceID`, `CertificateRequestId` and `Timestamp` are not signed (as in Intune's
  layout); `open_token` refuses a token whose outer values differ from the signed claims.

Single use and "profile still assigned" need the lab's state: see `lab.validator`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SIGN_CONTEXT = b"dmagent-lab CertEnrollChallenge v1\x00"
ENCRYPT_AAD = b"dmagent-lab CertEnrollChallenge v1"
DEFAULT_VALIDITY = timedelta(minutes=60)  # Intune: challenges are valid for one hour
MAX_TOKEN_CHARS = 64 * 1024

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class Reason(enum.StrEnum):
    """Why a challenge or CSR was refused (recorded in the CRS table), with its HRESULT."""

    NO_CHALLENGE = "no-challenge"
    MALFORMED = "malformed"
    UNKNOWN_SIGNER = "unknown-signer"
    BAD_SIGNATURE = "bad-signature"
    DECRYPT_FAILED = "decrypt-failed"
    HEADER_MISMATCH = "header-mismatch"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    UNKNOWN_CHALLENGE = "unknown-challenge"
    REUSED = "reused"
    UNASSIGNED = "profile-unassigned"
    BAD_CSR = "bad-csr"
    SUBJECT_MISMATCH = "subject-mismatch"
    SAN_MISMATCH = "san-mismatch"
    KEY_LENGTH_MISMATCH = "key-length-mismatch"
    EKU_MISMATCH = "eku-mismatch"
    KEY_USAGE_MISMATCH = "key-usage-mismatch"

    @property
    def hresult(self) -> int:
        return _HRESULTS[self]


_HRESULTS: dict[Reason, int] = {
    Reason.NO_CHALLENGE: 0x80070057,  # E_INVALIDARG
    Reason.MALFORMED: 0x80070057,
    Reason.UNKNOWN_SIGNER: 0x80090006,  # NTE_BAD_SIGNATURE
    Reason.BAD_SIGNATURE: 0x80090006,
    Reason.DECRYPT_FAILED: 0x80090006,
    Reason.HEADER_MISMATCH: 0x80090006,
    Reason.NOT_YET_VALID: 0x800B0101,  # CERT_E_EXPIRED (outside its validity period)
    Reason.EXPIRED: 0x800B0101,
    Reason.UNKNOWN_CHALLENGE: 0x80092004,  # CRYPT_E_NOT_FOUND
    Reason.REUSED: 0x800700B7,  # HRESULT_FROM_WIN32(ERROR_ALREADY_EXISTS)
    Reason.UNASSIGNED: 0x80070005,  # E_ACCESSDENIED
    Reason.BAD_CSR: 0x80090006,
    Reason.SUBJECT_MISMATCH: 0x80094001,  # CERTSRV_E_BAD_REQUESTSUBJECT
    Reason.SAN_MISMATCH: 0x80094001,
    Reason.KEY_LENGTH_MISMATCH: 0x80094811,  # CERTSRV_E_KEY_LENGTH
    Reason.EKU_MISMATCH: 0x800B0110,  # CERT_E_WRONG_USAGE
    Reason.KEY_USAGE_MISMATCH: 0x800B0110,
}


class ChallengeRefused(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Claims:
    """What a challenge authorizes: one CSR with exactly these properties."""

    challenge_id: str
    device_id: str
    profile_id: str
    unique_id: str
    request_id: str
    subject: tuple[tuple[str, str], ...]  # (OID, value), in order
    sans: tuple[tuple[int, str], ...]  # (CERT_ALT_NAME_*, value)
    key_length: int
    ekus: tuple[str, ...]
    key_usage: int
    nonce: str
    issued_at: datetime
    expires_at: datetime

    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "v": 1, "id": self.challenge_id, "device": self.device_id,
            "profile": self.profile_id, "unique_id": self.unique_id,
            "request_id": self.request_id, "subject": [list(p) for p in self.subject],
            "sans": [list(s) for s in self.sans], "key_length": self.key_length,
            "ekus": list(self.ekus), "key_usage": self.key_usage, "nonce": self.nonce,
            "iat": _iso(self.issued_at), "exp": _iso(self.expires_at),
        }
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Claims:
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("v") != 1:
                raise ValueError("unknown claims version")
            return cls(
                challenge_id=_s(d["id"]), device_id=_s(d["device"]), profile_id=_s(d["profile"]),
                unique_id=_s(d["unique_id"]), request_id=_s(d["request_id"]),
                subject=tuple((_s(o), _s(v)) for o, v in d["subject"]),
                sans=tuple((int(t), _s(v)) for t, v in d["sans"]),
                key_length=int(d["key_length"]), ekus=tuple(_s(e) for e in d["ekus"]),
                key_usage=int(d["key_usage"]), nonce=_s(d["nonce"]),
                issued_at=_parse_iso(_s(d["iat"])), expires_at=_parse_iso(_s(d["exp"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ChallengeRefused(Reason.MALFORMED, f"claims unreadable: {exc}") from None


def _s(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def intune_timestamp(t: datetime) -> str:
    """`2020-05-24T10:15:52.8276436Z`: seven fractional digits, as in seed 001."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond * 10:07d}Z"


def _parse_intune_timestamp(text: str) -> datetime:
    if not text.endswith("Z") or "." not in text:
        raise ValueError(f"bad Timestamp {text!r}")
    main, frac = text[:-1].split(".", 1)
    base = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return base.replace(microsecond=int(frac.ljust(7, "0")[:7]) // 10)


def thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 (a name, not security)


@dataclass(frozen=True)
class Signer:
    key: SigningKey
    cert: x509.Certificate

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.cert)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _verify(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(pub, rsa.RSAPublicKey):
        pub.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise InvalidSignature("unsupported signer key type")


# --- issuing -------------------------------------------------------------------------------

def new_claims(*, device_id: str, profile_id: str, unique_id: str, request_id: str,
               subject: tuple[tuple[str, str], ...], sans: tuple[tuple[int, str], ...],
               key_length: int, ekus: tuple[str, ...], key_usage: int, now: datetime,
               validity: timedelta = DEFAULT_VALIDITY,
               random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> Claims:
    return Claims(
        challenge_id=random_bytes(16).hex(), device_id=device_id, profile_id=profile_id,
        unique_id=unique_id, request_id=request_id, subject=subject, sans=sans,
        key_length=key_length, ekus=ekus, key_usage=key_usage, nonce=random_bytes(16).hex(),
        issued_at=now, expires_at=now + validity)


def issue_token(claims: Claims, signer: Signer, *, encryption_key: bytes | None = None,
                random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """The Challenge value: base64 of the CertEnrollToken XML."""
    payload = claims.to_json()
    if encryption_key is not None:
        iv = random_bytes(12)
        blob = b"E" + iv + AESGCM(encryption_key).encrypt(iv, payload, ENCRYPT_AAD)
    else:
        blob = b"P" + payload
    tp = signer.thumbprint
    signature = signer.sign(SIGN_CONTEXT + blob + tp.encode())
    xml = ("<CertEnrollToken><Data>"
           f"<CertEnrollChallenge>{base64.b64encode(blob).decode()}</CertEnrollChallenge>"
           f"<SignerThumbprint>{tp}</SignerThumbprint></Data>"
           f"<Signature>{signature.hex()}</Signature>"
           f"<DeviceID>{_xml_escape(claims.device_id)}</DeviceID>"
           f"<CertificateRequestId>{_xml_escape(claims.request_id)}</CertificateRequestId>"
           f"<Timestamp>{intune_timestamp(claims.issued_at)}</Timestamp>"
           "</CertEnrollToken>")
    return base64.b64encode(xml.encode()).decode()


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- opening -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    """The envelope fields, as read (before any verification)."""

    blob: bytes
    signer_thumbprint: str
    signature: bytes
    device_id: str
    request_id: str
    timestamp: str


def parse_token(token: str) -> Token:
    """Decode the envelope; ChallengeRefused(MALFORMED) on anything unexpected."""
    from lxml import etree

    if not token or not token.strip():
        raise ChallengeRefused(Reason.NO_CHALLENGE, "the CSR carries no challengePassword")
    if len(token) > MAX_TOKEN_CHARS:
        raise ChallengeRefused(Reason.MALFORMED, f"challenge longer than {MAX_TOKEN_CHARS}")
    try:
        xml = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ChallengeRefused(Reason.MALFORMED, "challenge is not base64 "
                               "(not a lab CertEnrollToken)") from None
    if b"<!" in xml:  # no DOCTYPE, no entities, no CDATA: the token is ours or hostile
        raise ChallengeRefused(Reason.MALFORMED, "challenge XML holds a DOCTYPE/CDATA")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, remove_comments=True)
    try:
        root = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as exc:
        raise ChallengeRefused(Reason.MALFORMED, f"challenge is not XML: {exc}") from None
    if root.tag != "CertEnrollToken":
        raise ChallengeRefused(Reason.MALFORMED, f"root element is {root.tag!r}, "
                               "not CertEnrollToken")

    def text(path: str) -> str:
        el = root.find(path)
        if el is None or not (el.text or "").strip():
            raise ChallengeRefused(Reason.MALFORMED, f"CertEnrollToken has no {path}")
        return (el.text or "").strip()

    try:
        blob = base64.b64decode(text("Data/CertEnrollChallenge"), validate=True)
        signature = bytes.fromhex(text("Signature"))
    except (binascii.Error, ValueError):
        raise ChallengeRefused(Reason.MALFORMED, "CertEnrollChallenge/Signature "
                               "not base64/hex") from None
    return Token(blob, text("Data/SignerThumbprint").upper(), signature, text("DeviceID"),
                 text("CertificateRequestId"), text("Timestamp"))


def open_token(token: str, signers: Mapping[str, x509.Certificate], *, now: datetime,
               encryption_key: bytes | None = None,
               skew: timedelta = timedelta(minutes=5)) -> Claims:
    """Verify signature, decrypt, check the envelope and the validity window → the claims.

    Refusals are ChallengeRefused with the reason; single use and assignment are the caller's.
    """
    tok = parse_token(token)
    cert = signers.get(tok.signer_thumbprint)
    if cert is None:
        raise ChallengeRefused(Reason.UNKNOWN_SIGNER,
                               f"signed by {tok.signer_thumbprint}, not a lab signing key")
    try:
        _verify(cert, tok.signature, SIGN_CONTEXT + tok.blob + tok.signer_thumbprint.encode())
    except (InvalidSignature, ValueError):
        raise ChallengeRefused(Reason.BAD_SIGNATURE, "the challenge signature does not verify "
                               "(tampered, or not issued by this lab)") from None
    kind, body = tok.blob[:1], tok.blob[1:]
    if kind == b"E":
        if encryption_key is None:
            raise ChallengeRefused(Reason.DECRYPT_FAILED, "challenge is encrypted but the lab "
                                   "has no challenge encryption key")
        try:
            payload = AESGCM(encryption_key).decrypt(body[:12], body[12:], ENCRYPT_AAD)
        except (InvalidTag, ValueError):
            raise ChallengeRefused(Reason.DECRYPT_FAILED, "challenge does not decrypt with "
                                   "the lab's key") from None
    elif kind == b"P":
        payload = body
    else:
        raise ChallengeRefused(Reason.MALFORMED, "unknown CertEnrollChallenge blob kind")
    claims = Claims.from_json(payload)
    if tok.device_id != claims.device_id or tok.request_id != claims.request_id:
        raise ChallengeRefused(Reason.HEADER_MISMATCH, "DeviceID/CertificateRequestId differ "
                               "from the signed challenge")
    try:
        ts = _parse_intune_timestamp(tok.timestamp)
    except ValueError as exc:
        raise ChallengeRefused(Reason.MALFORMED, str(exc)) from None
    if abs(ts - claims.issued_at) > timedelta(seconds=1):
        raise ChallengeRefused(Reason.HEADER_MISMATCH, "Timestamp differs from the signed one")
    if now + skew < claims.issued_at:
        raise ChallengeRefused(Reason.NOT_YET_VALID,
                               f"issued at {_iso(claims.issued_at)}, in the future")
    if now >= claims.expires_at:
        raise ChallengeRefused(Reason.EXPIRED, f"expired at {_iso(claims.expires_at)} "
                               f"(issued {_iso(claims.issued_at)}, valid "
                               f"{claims.expires_at - claims.issued_at})")
    return claims
