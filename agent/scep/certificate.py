"""X.509 certificates as the SCEP core reads them (RFC 5280 §4.1). Sans-IO.

The client needs a handful of fields from the CA/RA and issued certificates: the DER (for
thumbprints, PEM and the CMS `certificates` set), serial number and issuer (CMS
issuerAndSerialNumber), subject, validity, the SubjectPublicKeyInfo (to encrypt to the RA,
verify its signature and find the certificate issued for our key), and three extensions
(basicConstraints, keyUsage, subjectKeyIdentifier: the RA roles of RFC 8894 §4.2.1.2 and
CMS SignerIdentifier matching). They are read with `agent.scep.ber`, as the CMS around them
is: `cryptography.x509` costs a one-shot `dmagent scep enroll` ~20 ms to import (most of it
compiling the RFC 4514 parser's regular expressions), more than the enrollment's own work.

`Certificate.to_x509()` gives cryptography's full object to callers that want it (the
certificate store, the lab CA); the core functions accept either kind (`as_certificate`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING

from agent.scep import ber
from agent.scep.der import length as _der_length

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_KEY_USAGE = "2.5.29.15"
OID_SUBJECT_KEY_IDENTIFIER = "2.5.29.14"

# KeyUsage bits (RFC 5280 §4.2.1.3), numbered from the first (most significant) bit.
DIGITAL_SIGNATURE, KEY_ENCIPHERMENT, DATA_ENCIPHERMENT = 0, 2, 3


class Certificate:
    """One certificate: its DER and the fields the SCEP client uses. Immutable; equal when
    the encodings are. `Certificate(der)` refuses what is not a certificate (ValueError)."""

    __slots__ = ("_public_key", "der", "extensions", "issuer_der", "key_usage",
                 "not_valid_after_utc", "not_valid_before_utc", "serial_number", "spki_der",
                 "subject_der")

    der: bytes
    serial_number: int
    issuer_der: bytes  # the Name as encoded (DER)
    subject_der: bytes
    not_valid_before_utc: datetime
    not_valid_after_utc: datetime
    spki_der: bytes  # SubjectPublicKeyInfo
    extensions: Mapping[str, tuple[bool, bytes]]  # extnID -> (critical, extnValue)
    key_usage: frozenset[int] | None  # the bits set, None without the extension
    _public_key: PublicKeyTypes | None

    def __init__(self, der: bytes) -> None:
        """Parse `der`; ValueError (naming the fault) when it is not an X.509 certificate."""
        _set = object.__setattr__
        _set(self, "der", der)
        _set(self, "_public_key", None)
        cert = _definite(ber.one_element(der), "Certificate")
        parts = ber.sequence(cert, "Certificate")
        if len(parts) != 3:
            raise ValueError(f"a Certificate has 3 fields, this one {len(parts)}")
        tbs = ber.sequence(_definite(parts[0], "TBSCertificate"), "TBSCertificate")
        ber.algorithm(parts[1], "signatureAlgorithm")
        ber.expect(parts[2], ber.BIT_STRING, "signatureValue", constructed=False)
        at = 0
        if tbs and tbs[0][:3] == (2, 1, 0):  # version [0] EXPLICIT Version DEFAULT v1
            version = ber.read_int(ber.one_element(tbs[0][3]), "version")
            if version not in (1, 2):  # v2, v3; v1 is the DEFAULT, so never written (DER)
                raise ValueError(f"version {version} is not a valid X.509 version")
            at = 1
        if len(tbs) < at + 6:
            raise ValueError("TBSCertificate is incomplete")
        _set(self, "serial_number", ber.read_int(tbs[at], "serialNumber"))
        ber.algorithm(tbs[at + 1], "signature")
        _set(self, "issuer_der", _name(tbs[at + 2], "issuer"))
        validity = ber.sequence(tbs[at + 3], "validity")
        if len(validity) != 2:
            raise ValueError("validity needs notBefore and notAfter")
        _set(self, "not_valid_before_utc", read_time(validity[0], "notBefore"))
        _set(self, "not_valid_after_utc", read_time(validity[1], "notAfter"))
        _set(self, "subject_der", _name(tbs[at + 4], "subject"))
        spki = ber.sequence(tbs[at + 5], "subjectPublicKeyInfo")
        if len(spki) != 2:
            raise ValueError("subjectPublicKeyInfo needs algorithm and subjectPublicKey")
        ber.algorithm(spki[0], "subjectPublicKeyInfo algorithm")
        ber.expect(spki[1], ber.BIT_STRING, "subjectPublicKey", constructed=False)
        _set(self, "spki_der", tbs[at + 5][4])
        extensions: dict[str, tuple[bool, bytes]] = {}
        for element in tbs[at + 6:]:
            if element[0] == 2 and element[2] == 3:  # extensions [3] EXPLICIT
                extensions = _extensions(ber.expect(element, 3, "extensions", cls=2,
                                                    constructed=True))
            elif element[0] != 2 or element[2] not in (1, 2):  # issuer/subjectUniqueID
                raise ValueError(f"TBSCertificate has an unexpected field (class "
                                 f"{element[0]} tag {element[2]})")
        _set(self, "extensions", MappingProxyType(extensions))
        _set(self, "key_usage", _key_usage(extensions))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Certificate is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Certificate) and other.der == self.der

    def __hash__(self) -> int:
        return hash(self.der)

    def __repr__(self) -> str:
        return f"<Certificate {self.subject} serial={self.serial_number:x}>"

    # --- derived views ---------------------------------------------------------------------

    @property
    def subject(self) -> str:
        """The subject as CertNameToStr writes it (`CN=..., O=...`)."""
        from agent.csr import name_to_str

        return name_to_str(self.subject_der)

    @property
    def issuer(self) -> str:
        from agent.csr import name_to_str

        return name_to_str(self.issuer_der)

    @property
    def thumbprint(self) -> str:
        """SHA-1 over the DER, upper-case hex: what CAThumbprint and Windows show."""
        from cryptography.hazmat.primitives import hashes

        digest = hashes.Hash(hashes.SHA1())  # noqa: S303 - a name, not security
        digest.update(self.der)
        return digest.finalize().hex().upper()

    @property
    def is_ca(self) -> bool | None:
        """basicConstraints cA; None when the certificate has no basicConstraints."""
        found = self.extensions.get(OID_BASIC_CONSTRAINTS)
        if found is None:
            return None
        fields = ber.sequence(ber.one_element(found[1]), "BasicConstraints")
        return bool(fields and fields[0][:3] == (0, 0, 1) and fields[0][3] != b"\x00")

    @property
    def subject_key_identifier(self) -> bytes | None:
        found = self.extensions.get(OID_SUBJECT_KEY_IDENTIFIER)
        if found is None:
            return None
        return ber.read_octets(ber.one_element(found[1]), "SubjectKeyIdentifier")

    def public_key(self) -> PublicKeyTypes:
        """The subject's public key (cryptography's object; loaded once)."""
        key = self._public_key
        if key is None:
            from cryptography.hazmat.primitives.serialization import load_der_public_key

            key = load_der_public_key(self.spki_der)
            object.__setattr__(self, "_public_key", key)
        return key

    def pem(self) -> str:
        body = base64.encodebytes(self.der).decode("ascii").replace("\n", "")
        lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"

    def to_x509(self) -> x509.Certificate:
        """cryptography's certificate object (strict DER parse: ValueError if it refuses)."""
        from cryptography import x509

        return x509.load_der_x509_certificate(self.der)


if TYPE_CHECKING:
    CertificateLike = Certificate | x509.Certificate  # what the core functions accept


def as_certificate(cert: CertificateLike) -> Certificate:
    """Ours as is; a cryptography certificate (anything with `public_bytes`) re-read."""
    if isinstance(cert, Certificate):
        return cert
    from cryptography.hazmat.primitives.serialization import Encoding

    return Certificate(cert.public_bytes(Encoding.DER))


def names_equal(a: bytes, b: bytes) -> bool:
    """Two DER Names equal: the same bytes (the usual case, cheap), else by RFC 5280 §7.1
    comparison (case and space folding, string types) for names encoded apart."""
    if a == b:
        return True
    from asn1crypto import x509 as ax509

    try:
        return bool(ax509.Name.load(ber.ber_to_der_lengths(a)) ==
                    ax509.Name.load(ber.ber_to_der_lengths(b)))
    except ValueError:
        return False


def read_time(element: ber.Element, what: str) -> datetime:
    """UTCTime or GeneralizedTime as RFC 5280 §4.1.2.5 profiles them (UTC, seconds, `Z`)."""
    cls, method, tag, contents, _ = element
    if cls != 0 or method or tag not in (23, 24):
        raise ValueError(f"{what} is not a UTCTime or GeneralizedTime")
    text = contents.decode("ascii", "replace")
    digits = 12 if tag == 23 else 14
    if len(text) != digits + 1 or text[-1] != "Z" or not text[:-1].isdigit():
        raise ValueError(f"{what} {text!r} is not in the RFC 5280 form")
    if tag == 23:  # two-digit years: 50-99 are 19xx (RFC 5280 §4.1.2.5.1)
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    try:  # the fields by position (strptime would import _strptime and its locale tables)
        return datetime(int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]),
                        int(text[10:12]), int(text[12:14]), tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a valid time") from None


def _definite(element: ber.Element, what: str) -> ber.Element:
    """A certificate is DER (RFC 5280 §4.1): minimal definite lengths where we can see."""
    full, contents = element[4], element[3]
    length = _der_length(len(contents))
    if full[1:1 + len(length)] != length or len(full) != 1 + len(length) + len(contents):
        raise ValueError(f"{what} is not DER-encoded")
    return element


def _name(element: ber.Element, what: str) -> bytes:
    """A Name (RFC 5280 §4.1.2.4): SEQUENCE OF RDN, each a SET OF {type OID, value}."""
    for rdn in ber.sequence(element, what):
        atvs = ber.ber_elements(ber.expect(rdn, ber.SET, f"{what} RDN", constructed=True))
        if not atvs:
            raise ValueError(f"{what} has an empty RelativeDistinguishedName")
        for atv in atvs:
            fields = ber.sequence(atv, f"{what} AttributeTypeAndValue")
            if len(fields) != 2:
                raise ValueError(f"{what} has an attribute without a type and a value")
            ber.read_oid(fields[0], f"{what} attribute type")
    return element[4]


def _extensions(contents: bytes) -> dict[str, tuple[bool, bytes]]:
    out: dict[str, tuple[bool, bytes]] = {}
    for ext in ber.sequence(ber.one_element(contents), "Extensions"):
        fields = ber.sequence(ext, "Extension")
        if len(fields) not in (2, 3):
            raise ValueError("an Extension has extnID, [critical,] extnValue")
        oid = ber.read_oid(fields[0], "extnID")
        critical = len(fields) == 3 and ber.expect(fields[1], 1, "critical") != b"\x00"
        if oid in out:  # RFC 5280 §4.2: at most one instance of an extension
            raise ValueError(f"extension {oid} appears twice")
        out[oid] = critical, ber.read_octets(fields[-1], "extnValue")
    return out


def _key_usage(extensions: Mapping[str, tuple[bool, bytes]]) -> frozenset[int] | None:
    found = extensions.get(OID_KEY_USAGE)
    if found is None:
        return None
    bits = ber.expect(ber.one_element(found[1]), ber.BIT_STRING, "KeyUsage",
                      constructed=False)
    if not bits or bits[0] > 7:
        raise ValueError("KeyUsage is not a valid BIT STRING")
    return frozenset(i * 8 + j for i, byte in enumerate(bits[1:]) for j in range(8)
                     if byte & (0x80 >> j))
