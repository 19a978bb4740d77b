"""Helpers for tests and demos: CSRs like Windows builds them from a delivered profile.

(`LabServer` and `micromdm_with_validator` are added with the server; see below.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AttributeOID, ObjectIdentifier

from lab.csrcheck import UPN_OID

CsrKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _der_utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) < 0x80:
        return bytes([0x0C, len(raw)]) + raw
    n = (len(raw).bit_length() + 7) // 8
    return bytes([0x0C, 0x80 | n]) + len(raw).to_bytes(n, "big") + raw


def general_name(san_type: int, value: str) -> x509.GeneralName:
    if san_type == 2:
        return x509.RFC822Name(value)
    if san_type == 3:
        return x509.DNSName(value)
    if san_type == 7:
        return x509.UniformResourceIdentifier(value)
    if san_type == 8:
        return x509.IPAddress(ipaddress.ip_address(value))
    if san_type == 9:
        return x509.RegisteredID(ObjectIdentifier(value))
    if san_type in (1, 11):
        return x509.OtherName(ObjectIdentifier(UPN_OID), _der_utf8(value))
    raise ValueError(f"unsupported SAN type {san_type}")


def key_usage_ext(bits: int) -> x509.KeyUsage:
    agree = bool(bits & 0x08)
    return x509.KeyUsage(
        digital_signature=bool(bits & 0x80), content_commitment=bool(bits & 0x40),
        key_encipherment=bool(bits & 0x20), data_encipherment=bool(bits & 0x10),
        key_agreement=agree, key_cert_sign=bool(bits & 0x04), crl_sign=bool(bits & 0x02),
        encipher_only=agree and bool(bits & 0x01), decipher_only=agree and bool(bits & 0x8000))


def build_csr(key: CsrKey, *, subject: Sequence[tuple[str, str]],
              sans: Sequence[tuple[int, str]] = (), ekus: Sequence[str] = (),
              key_usage: int | None = None, challenge: str | None = None) -> bytes:
    """A DER PKCS#10 with the given subject pairs, SANs, EKUs, key usage and challengePassword."""
    name = x509.Name([x509.NameAttribute(ObjectIdentifier(oid), value) for oid, value in subject])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([general_name(t, v) for t, v in sans]), critical=False)
    if ekus:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ObjectIdentifier(o) for o in ekus]), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(key_usage_ext(key_usage), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
