"""Read a PKCS#10 request and compare it with what its challenge authorized (sans-IO).

What the Intune connector checks (seeds 000/001/002): the CSR's subject, SANs, key length, EKUs
and key usage must be those the challenge was issued for. Comparison rules (documented because
Windows and the lab may encode the same thing differently):
- subject: the multiset of (attribute OID, value) pairs, values compared exactly; RDN order is not
  compared (CertStrToName and other encoders disagree on it).
- SANs: the multiset of (CERT_ALT_NAME_* type, value); DNS names case-insensitively, IPs
  normalized, UPN other-names (1.3.6.1.4.1.311.20.2.3) as type 11.
- key length: RSA modulus bits (an EC key never matches an RSA KeyLength).
- EKUs: the set of OIDs; key usage: the exact bit set (Windows' CERT_*_KEY_USAGE numbering).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AttributeOID, ExtensionOID

from lab.challenge import ChallengeRefused, Claims, Reason

UPN_OID = "1.3.6.1.4.1.311.20.2.3"


@dataclass(frozen=True)
class CsrInfo:
    der: bytes
    challenge: str
    subject: tuple[tuple[str, str], ...]
    sans: tuple[tuple[int, str], ...]
    key_length: int
    key_type: str
    ekus: tuple[str, ...]
    key_usage: int | None  # None: no KeyUsage extension requested
    spki_sha1: str  # SHA-1 of the SubjectPublicKeyInfo (to match the issued certificate)


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """PEM or DER; ChallengeRefused(BAD_CSR) when it is neither or its signature is wrong."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise ChallengeRefused(Reason.BAD_CSR, f"not a PKCS#10 request: {exc}") from None
    if not csr.is_signature_valid:
        raise ChallengeRefused(Reason.BAD_CSR, "the CSR's self-signature does not verify")
    return csr


def spki_sha1(public_key: object) -> str:
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    h = hashes.Hash(hashes.SHA1())  # noqa: S303 (an identifier, not a security use)
    h.update(der)
    return h.finalize().hex().upper()


def csr_info(data: bytes) -> CsrInfo:
    csr = load_csr(data)
    try:
        raw = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
        challenge = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except x509.AttributeNotFound:
        challenge = ""
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChallengeRefused(Reason.BAD_CSR, f"unreadable challengePassword: {exc}") from None
    try:
        exts = csr.extensions
    except ValueError as exc:
        raise ChallengeRefused(Reason.BAD_CSR, f"unreadable extension request: {exc}") from None
    subject = tuple((a.oid.dotted_string, _attr_text(a.value)) for a in csr.subject)
    sans: list[tuple[int, str]] = []
    ekus: tuple[str, ...] = ()
    key_usage: int | None = None
    for ext in exts:
        if ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            assert isinstance(ext.value, x509.SubjectAlternativeName)
            sans.extend(_san(n) for n in ext.value)
        elif ext.oid == ExtensionOID.EXTENDED_KEY_USAGE:
            assert isinstance(ext.value, x509.ExtendedKeyUsage)
            ekus = tuple(o.dotted_string for o in ext.value)
        elif ext.oid == ExtensionOID.KEY_USAGE:
            assert isinstance(ext.value, x509.KeyUsage)
            key_usage = key_usage_bits(ext.value)
    pub = csr.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        key_type, key_length = "RSA", pub.key_size
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        key_type, key_length = f"EC {pub.curve.name}", pub.key_size
    else:
        key_type, key_length = type(pub).__name__, 0
    der = csr.public_bytes(serialization.Encoding.DER)
    return CsrInfo(der, challenge, subject, tuple(sans), key_length, key_type, ekus, key_usage,
                   spki_sha1(pub))


def _attr_text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _san(name: x509.GeneralName) -> tuple[int, str]:
    if isinstance(name, x509.DNSName):
        return 3, name.value
    if isinstance(name, x509.RFC822Name):
        return 2, name.value
    if isinstance(name, x509.UniformResourceIdentifier):
        return 7, name.value
    if isinstance(name, x509.IPAddress):
        return 8, str(name.value)
    if isinstance(name, x509.RegisteredID):
        return 9, name.value.dotted_string
    if isinstance(name, x509.OtherName):
        if name.type_id.dotted_string == UPN_OID:
            return 11, _utf8_string(name.value)
        return 1, f"{name.type_id.dotted_string}:{name.value.hex()}"
    return 0, str(name.value)


def _utf8_string(der: bytes) -> str:
    """The UTF8String inside a UPN other-name (tag 0x0C, short or long form length)."""
    if len(der) < 2 or der[0] != 0x0C:
        return der.hex()
    length, off = der[1], 2
    if length & 0x80:
        n = length & 0x7F
        length, off = int.from_bytes(der[2:2 + n], "big"), 2 + n
    return der[off:off + length].decode("utf-8", "replace")


def key_usage_bits(ku: x509.KeyUsage) -> int:
    bits = 0
    for flag, attr in ((0x80, "digital_signature"), (0x40, "content_commitment"),
                       (0x20, "key_encipherment"), (0x10, "data_encipherment"),
                       (0x08, "key_agreement"), (0x04, "key_cert_sign"), (0x02, "crl_sign")):
        if getattr(ku, attr):
            bits |= flag
    if ku.key_agreement:
        if ku.encipher_only:
            bits |= 0x01
        if ku.decipher_only:
            bits |= 0x8000
    return bits


def _norm_san(t: int, v: str) -> tuple[int, str]:
    if t == 3:
        return t, v.lower().rstrip(".")
    if t == 8:
        try:
            return t, str(ipaddress.ip_address(v))
        except ValueError:
            return t, v
    return t, v


def mismatches(claims: Claims, info: CsrInfo) -> list[ChallengeRefused]:
    """Every difference between the CSR and its challenge (empty: the CSR is as authorized)."""
    out: list[ChallengeRefused] = []
    if Counter(claims.subject) != Counter(info.subject):
        out.append(ChallengeRefused(Reason.SUBJECT_MISMATCH,
                                    f"subject {_pairs(info.subject)} but the challenge was "
                                    f"issued for {_pairs(claims.subject)}"))
    want_sans = Counter(_norm_san(t, v) for t, v in claims.sans)
    got_sans = Counter(_norm_san(t, v) for t, v in info.sans)
    if want_sans != got_sans:
        out.append(ChallengeRefused(Reason.SAN_MISMATCH,
                                    f"SANs {_sans(info.sans)} but the challenge was issued for "
                                    f"{_sans(claims.sans)}"))
    if info.key_type != "RSA" or info.key_length != claims.key_length:
        out.append(ChallengeRefused(Reason.KEY_LENGTH_MISMATCH,
                                    f"{info.key_type} {info.key_length}-bit key but the "
                                    f"challenge requires RSA {claims.key_length}"))
    if set(info.ekus) != set(claims.ekus):
        out.append(ChallengeRefused(Reason.EKU_MISMATCH,
                                    f"EKUs {'+'.join(info.ekus) or '(none)'} but the challenge "
                                    f"requires {'+'.join(claims.ekus)}"))
    if info.key_usage != claims.key_usage:
        got = "(none)" if info.key_usage is None else f"{info.key_usage} (0x{info.key_usage:X})"
        out.append(ChallengeRefused(Reason.KEY_USAGE_MISMATCH,
                                    f"key usage {got} but the challenge requires "
                                    f"{claims.key_usage} (0x{claims.key_usage:X})"))
    return out


def _pairs(pairs: tuple[tuple[str, str], ...]) -> str:
    from lab.x500 import OID_KEYS, quote_value

    return ",".join(f"{OID_KEYS.get(o, o)}={quote_value(v)}" for o, v in pairs) or "(empty)"


def _sans(sans: tuple[tuple[int, str], ...]) -> str:
    return ";".join(f"{t}+{v}" for t, v in sans) or "(none)"
