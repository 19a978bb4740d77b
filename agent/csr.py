"""PKCS#10 requests from ClientCertificateInstall Install values, signed through a key handle.

Sans-IO. The Install values arrive from the MDM server (DESIGN.md §3): SubjectName as an X.500
string with CertNameToStr quoting, SubjectAlternativeNames as `<format>+<value>;...`, KeyUsage
as decimal CERT_*_KEY_USAGE bits, EKUMapping as `+`-joined OIDs, TemplateName, ValidPeriod and
ValidPeriodUnits, HashAlgorithm. A value that cannot be used is the *server's* profile error:
`PeerError` with E_INVALIDARG and a message naming the node and the value.

The DER is assembled here (a few TLV helpers) rather than through asn1crypto's high-level
classes so every string type is exactly the one chosen (PrintableString when it fits, else
UTF8String, as Windows' CertStrToName does); `cryptography` parses the result in the tests.
asn1crypto is imported only to check `#hex` values.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.scep import der
from keystores.base import HashAlg, KeyAlgorithm, KeyHandle

# DER building blocks (shared with the SCEP messages).
tlv, seq, set_of, oid = der.tlv, der.seq, der.set_of, der.oid


_PRINTABLE = re.compile(r"^[A-Za-z0-9 '()+,\-./:=?]*$")


def directory_string(text: str) -> bytes:
    """PrintableString when every character allows it, else UTF8String (X.520)."""
    if _PRINTABLE.match(text):
        return der.printable_string(text)
    return der.utf8_string(text)


def _bad(node: str, value: str, why: str) -> PeerError:
    return PeerError(f"Install/{node} value {value!r} is invalid: {why}",
                     hresult=HResult.E_INVALIDARG,
                     advice=f"fix {node} in the SCEP profile on the MDM server")


# --- SubjectName (CertStrToName, CERT_X500_NAME_STR) ----------------------------------------

class _Enc(enum.Enum):
    DIRECTORY = "directory"  # PrintableString if it fits, else UTF8String
    PRINTABLE = "printable"
    IA5 = "ia5"


# The X.500 keys CertStrToName accepts (wincrypt.h szOID_* names), upper-cased.
_KEYS: dict[str, tuple[str, _Enc]] = {
    "CN": ("2.5.4.3", _Enc.DIRECTORY), "SN": ("2.5.4.4", _Enc.DIRECTORY),
    "SERIALNUMBER": ("2.5.4.5", _Enc.PRINTABLE), "C": ("2.5.4.6", _Enc.PRINTABLE),
    "L": ("2.5.4.7", _Enc.DIRECTORY), "S": ("2.5.4.8", _Enc.DIRECTORY),
    "ST": ("2.5.4.8", _Enc.DIRECTORY), "STREET": ("2.5.4.9", _Enc.DIRECTORY),
    "O": ("2.5.4.10", _Enc.DIRECTORY), "OU": ("2.5.4.11", _Enc.DIRECTORY),
    "T": ("2.5.4.12", _Enc.DIRECTORY), "TITLE": ("2.5.4.12", _Enc.DIRECTORY),
    "DESCRIPTION": ("2.5.4.13", _Enc.DIRECTORY), "POSTALCODE": ("2.5.4.17", _Enc.DIRECTORY),
    "POBOX": ("2.5.4.18", _Enc.DIRECTORY), "PHONE": ("2.5.4.20", _Enc.PRINTABLE),
    "G": ("2.5.4.42", _Enc.DIRECTORY), "GIVENNAME": ("2.5.4.42", _Enc.DIRECTORY),
    "I": ("2.5.4.43", _Enc.DIRECTORY), "INITIALS": ("2.5.4.43", _Enc.DIRECTORY),
    "DNQUALIFIER": ("2.5.4.46", _Enc.PRINTABLE),
    "E": ("1.2.840.113549.1.9.1", _Enc.IA5), "EMAIL": ("1.2.840.113549.1.9.1", _Enc.IA5),
    "DC": ("0.9.2342.19200300.100.1.25", _Enc.IA5),
    "UID": ("0.9.2342.19200300.100.1.1", _Enc.DIRECTORY),
}
# How CertNameToStr names each OID (first key wins).
_NAMES: dict[str, str] = {}
for _key, (_oid, _) in _KEYS.items():
    _NAMES.setdefault(_oid, _key)
_NAMES["1.2.840.113549.1.9.1"] = "E"
_NAMES["2.5.4.8"] = "S"
_OID_RE = re.compile(r"^(?:OID\.)?([0-2](?:\.\d+)+)$", re.IGNORECASE)
# Characters that force quoting in CertNameToStr output.
_QUOTE_CHARS = set(',+="\n<>#;')


@dataclass(frozen=True)
class NameAttribute:
    oid: str
    value: str
    raw_der: bytes = b""  # `OID=#hex` values: the DER given verbatim


def parse_subject(text: str, node: str = "SubjectName") -> list[list[NameAttribute]]:
    """Split an X.500 string into RDNs (lists of attributes; `+` joins a multi-valued RDN).

    CertStrToName rules: `,` or `;` separate RDNs, `+` joins attributes in one RDN, a value
    may be wrapped in double quotes (inside them `""` is a quote and separators are literal),
    unquoted values are trimmed. A backslash is an ordinary character (`CN=DOMAIN\\user`).
    """
    rdns: list[list[NameAttribute]] = []
    current: list[NameAttribute] = []
    i, n = 0, len(text)
    after_separator = False
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            if after_separator:
                raise _bad(node, text, "it ends with a separator")
            break
        eq = text.find("=", i)
        if eq < 0:
            raise _bad(node, text, f"{text[i:]!r} has no '='")
        key = text[i:eq].strip()
        if not key or any(c in key for c in ',;+"'):
            raise _bad(node, text, f"{key!r} is not an attribute name")
        attr_oid, enc = _lookup_key(key, node, text)
        i = eq + 1
        while i < n and text[i] in " \t":
            i += 1
        raw = b""
        if i < n and text[i] == '"':
            value, i = _quoted(text, i + 1, node)
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] not in ",;+":
                raise _bad(node, text, f"unexpected {text[i]!r} after a quoted value")
        else:
            start = i
            while i < n and text[i] not in ",;+":
                i += 1
            value = text[start:i].strip()
            if value.startswith("#") and enc is None:
                raw = _hex_value(value, node, text)
        if not value:
            raise _bad(node, text, f"{key} has an empty value")
        if attr_oid == "2.5.4.6" and len(value) != 2:
            raise _bad(node, text, f"C={value!r} is not a two-letter country code")
        if enc is _Enc.IA5 and not value.isascii():
            raise _bad(node, text, f"{key}={value!r} must be ASCII")
        current.append(NameAttribute(attr_oid, value, raw))
        if i >= n:
            rdns.append(current)
            break
        sep = text[i]
        i += 1
        after_separator = True
        if sep != "+":
            rdns.append(current)
            current = []
    return rdns


def _lookup_key(key: str, node: str, text: str) -> tuple[str, _Enc | None]:
    known = _KEYS.get(key.upper())
    if known is not None:
        return known
    m = _OID_RE.match(key)
    if m is None:
        raise _bad(node, text, f"unknown attribute {key!r}")
    dotted = m.group(1)
    for k_oid, enc in _KEYS.values():
        if k_oid == dotted:
            return k_oid, enc
    return dotted, None  # an OID outside the table: DirectoryString, or #hex DER


def _quoted(text: str, i: int, node: str) -> tuple[str, int]:
    out: list[str] = []
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            if i + 1 < n and text[i + 1] == '"':
                out.append('"')
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise _bad(node, text, "a quoted value is not closed")


def _hex_value(value: str, node: str, text: str) -> bytes:
    from asn1crypto import core  # only for `#hex` values, which are rare

    try:
        raw = bytes.fromhex(value[1:])
        core.Asn1Value.load(raw, strict=True)
    except ValueError:
        raise _bad(node, text, f"{value!r} is not hex-encoded DER") from None
    return raw


def _encode_value(attr: NameAttribute) -> bytes:
    if attr.raw_der:
        return attr.raw_der
    enc = next((e for o, e in _KEYS.values() if o == attr.oid), _Enc.DIRECTORY)
    if enc is _Enc.IA5:
        return tlv(0x16, attr.value.encode("ascii"))  # IA5String
    if enc is _Enc.PRINTABLE and _PRINTABLE.match(attr.value):
        return der.printable_string(attr.value)
    return directory_string(attr.value)


def encode_name(rdns: Sequence[Sequence[NameAttribute]]) -> bytes:
    """DER Name (RDNSequence) in the order written, as CertStrToName encodes it."""
    return seq(*(set_of([seq(oid(a.oid), _encode_value(a)) for a in rdn]) for rdn in rdns))


def subject_der(text: str, node: str = "SubjectName") -> bytes:
    return encode_name(parse_subject(text, node))


# DirectoryString-like types a name value is text in (X.520), and how their bytes decode.
_STRING_CODECS = {0x13: "latin-1", 0x0C: "utf-8", 0x16: "ascii", 0x1A: "ascii", 0x12: "ascii",
                  0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}


def name_to_str(name_der: bytes, separator: str = ", ") -> str:
    """CertNameToStr(CERT_X500_NAME_STR) rendering of a DER Name, for display and round trips.

    String values are text (quoted when CertNameToStr quotes); any other value is `#` and
    its hex DER, as CertNameToStr writes values it cannot show.
    """
    from agent.scep import ber

    parts: list[str] = []
    for rdn in ber.sequence(ber.one_element(name_der), "Name"):
        atoms = []
        for atv in ber.ber_elements(ber.expect(rdn, ber.SET, "RelativeDistinguishedName",
                                               constructed=True)):
            oid_el, value_el = ber.sequence(atv, "AttributeTypeAndValue")
            dotted = ber.read_oid(oid_el)
            key = _NAMES.get(dotted, f"OID.{dotted}")
            cls, method, tag, contents, full = value_el
            codec = _STRING_CODECS.get(tag) if cls == 0 and not method else None
            try:
                value = contents.decode(codec) if codec else None
            except UnicodeDecodeError:
                value = None
            if value is None:
                atoms.append(f"{key}=#{full.hex()}")
                continue
            if (not value or value != value.strip() or any(c in _QUOTE_CHARS for c in value)):
                value = '"' + value.replace('"', '""') + '"'
            atoms.append(f"{key}={value}")
        parts.append(" + ".join(atoms))
    return separator.join(parts)


# --- SubjectAlternativeNames ----------------------------------------------------------------

class AltNameFormat(enum.IntEnum):
    """The `<format>` numbers of SubjectAlternativeNames (CERT_ALT_NAME_*; 11 = UPN)."""

    OTHER_NAME_UPN = 1
    RFC822 = 2
    DNS = 3
    DIRECTORY_NAME = 5
    URL = 7
    IP_ADDRESS = 8
    REGISTERED_ID = 9
    UPN = 11


OID_UPN = "1.3.6.1.4.1.311.20.2.3"  # szOID_NT_PRINCIPAL_NAME


def parse_sans(text: str, node: str = "SubjectAlternativeNames") -> list[bytes]:
    """`<format>+<value>;...` to DER GeneralName elements (RFC 5280 §4.2.1.6)."""
    names: list[bytes] = []
    for raw_entry in text.split(";"):
        entry = raw_entry.strip()
        if not entry:
            continue
        fmt_text, plus, value = entry.partition("+")
        value = value.strip()
        if not plus or not value:
            raise _bad(node, text, f"{entry!r} is not <format>+<value>")
        try:
            fmt = AltNameFormat(int(fmt_text.strip()))
        except ValueError:
            raise _bad(node, text, f"{fmt_text.strip()!r} is not a supported name format "
                       "(1/11 UPN, 2 RFC822, 3 DNS, 5 directory name, 7 URL, 8 IP, "
                       "9 registered ID)") from None
        names.append(_general_name(fmt, value, node, text))
    return names


def _ia5(value: str, what: str, node: str, text: str) -> bytes:
    if not value.isascii() or any(ord(c) < 0x20 for c in value):
        raise _bad(node, text, f"{what} {value!r} must be printable ASCII")
    return value.encode("ascii")


def _general_name(fmt: AltNameFormat, value: str, node: str, text: str) -> bytes:
    if fmt in (AltNameFormat.OTHER_NAME_UPN, AltNameFormat.UPN):
        # otherName [0] { type-id, [0] EXPLICIT UTF8String }
        return tlv(0xA0, oid(OID_UPN), tlv(0xA0, der.utf8_string(value)))
    if fmt is AltNameFormat.RFC822:
        if "@" not in value:
            raise _bad(node, text, f"RFC822 name {value!r} has no '@'")
        return tlv(0x81, _ia5(value, "RFC822 name", node, text))
    if fmt is AltNameFormat.DNS:
        try:
            ascii_name = value.encode("idna").decode("ascii") if not value.isascii() else value
        except UnicodeError:
            raise _bad(node, text, f"DNS name {value!r} cannot be IDNA-encoded") from None
        if " " in ascii_name or ascii_name.startswith(".") or ".." in ascii_name:
            raise _bad(node, text, f"{value!r} is not a DNS name")
        return tlv(0x82, _ia5(ascii_name, "DNS name", node, text))
    if fmt is AltNameFormat.DIRECTORY_NAME:
        return tlv(0xA4, subject_der(value, node))
    if fmt is AltNameFormat.URL:
        if ":" not in value:
            raise _bad(node, text, f"URL {value!r} has no scheme")
        return tlv(0x86, _ia5(value, "URL", node, text))
    if fmt is AltNameFormat.IP_ADDRESS:
        try:
            import ipaddress

            packed = ipaddress.ip_address(value.strip("[]")).packed
        except ValueError:
            raise _bad(node, text, f"{value!r} is not an IPv4 or IPv6 address") from None
        return tlv(0x87, packed)
    # REGISTERED_ID: [8] IMPLICIT OBJECT IDENTIFIER
    if not re.fullmatch(r"[0-2](\.\d+)+", value):
        raise _bad(node, text, f"{value!r} is not an OID")
    return tlv(0x88, oid(value)[2:])


# --- KeyUsage, EKUMapping, TemplateName, ValidPeriod, HashAlgorithm -------------------------

# CERT_*_KEY_USAGE bits (wincrypt.h) -> KeyUsage BIT STRING bit numbers (RFC 5280 §4.2.1.3).
_KU_BITS = {0x80: 0, 0x40: 1, 0x20: 2, 0x10: 3, 0x08: 4, 0x04: 5, 0x02: 6, 0x01: 7,
            0x8000: 8}
_KU_NAMES = {0x80: "digitalSignature", 0x40: "nonRepudiation", 0x20: "keyEncipherment",
             0x10: "dataEncipherment", 0x08: "keyAgreement", 0x04: "keyCertSign",
             0x02: "cRLSign", 0x01: "encipherOnly", 0x8000: "decipherOnly"}


def parse_key_usage(value: int | str, node: str = "KeyUsage") -> int:
    """Validate CERT_*_KEY_USAGE bits: known bits only, with 0x80 and/or 0x20 (the CSP rule)."""
    text = str(value).strip()
    try:
        bits = int(text, 0) if isinstance(value, str) else int(value)
    except ValueError:
        raise _bad(node, text, "not a number") from None
    unknown = bits & ~sum(_KU_BITS)
    if bits <= 0 or unknown:
        raise _bad(node, text, f"bits 0x{unknown or bits:x} are not CERT_*_KEY_USAGE flags")
    if bits & 0x8001 and not bits & 0x08:
        raise _bad(node, text, "encipherOnly (0x01) and decipherOnly (0x8000) need keyAgreement "
                               "(0x08) (RFC 5280 §4.2.1.3)")
    if not bits & 0xA0:
        raise _bad(node, text, "must include digitalSignature (0x80) and/or keyEncipherment "
                               "(0x20)")
    return bits


def key_usage_names(bits: int) -> list[str]:
    return [name for bit, name in _KU_NAMES.items() if bits & bit]


def key_usage_extension(bits: int) -> bytes:
    bit_numbers = sorted(_KU_BITS[b] for b in _KU_BITS if bits & b)
    nbits = bit_numbers[-1] + 1
    nbytes = (nbits + 7) // 8
    value = 0
    for b in bit_numbers:
        value |= 1 << (nbytes * 8 - 1 - b)
    unused = nbytes * 8 - nbits
    bitstring = tlv(0x03, bytes([unused]), value.to_bytes(nbytes, "big"))
    return extension("2.5.29.15", bitstring, critical=True)


def parse_eku(text: str, node: str = "EKUMapping") -> list[str]:
    oids = [p.strip() for p in text.split("+") if p.strip()]
    for o in oids:
        if not re.fullmatch(r"[0-2](\.\d+)+", o):
            raise _bad(node, text, f"{o!r} is not an OID")
    return oids


def extension(ext_oid: str, value_der: bytes, critical: bool = False) -> bytes:
    crit = b"\x01\x01\xff" if critical else b""
    return seq(oid(ext_oid), crit, tlv(0x04, value_der))


class ValidityUnit(enum.StrEnum):
    """ValidPeriod values (the CSP documents Days, Months, Years; MS-WCCE adds Weeks)."""

    DAYS = "Days"
    WEEKS = "Weeks"
    MONTHS = "Months"
    YEARS = "Years"


def parse_valid_period(period: str, units: int | str,
                       ) -> tuple[ValidityUnit, int] | None:
    """ValidPeriod + ValidPeriodUnits, or None when no validity is requested."""
    if not str(period).strip() and not str(units).strip():
        return None
    try:
        count = int(str(units).strip() or "0")
    except ValueError:
        raise _bad("ValidPeriodUnits", str(units), "not a number") from None
    if count < 0:
        raise _bad("ValidPeriodUnits", str(units), "must not be negative")
    if not str(period).strip():
        if count:
            raise _bad("ValidPeriod", "", "ValidPeriodUnits is set but ValidPeriod is not")
        return None
    for unit in ValidityUnit:
        if unit.value.lower() == str(period).strip().lower():
            return (unit, count) if count else None
    raise _bad("ValidPeriod", str(period), "must be Days, Weeks, Months or Years")


def csr_hash(value: str, node: str = "HashAlgorithm") -> HashAlg:
    """The CSR signature hash for an Install HashAlgorithm value (`SHA-1`, `SHA-2`, `SHA-3`,
    `+`-joined): SHA-256 in every case.

    SHA-1 is below the floor (`cryptography` and current CAs refuse SHA-1 CSR signatures) and
    SHA-3 is not something key stores (TPMs, CNG KSPs) sign with, so the family is satisfied by
    SHA-256 — the value is still validated so a malformed profile is reported.
    """
    for part in (p.strip().upper() for p in value.split("+")):
        if part and part not in ("SHA-1", "SHA1", "SHA-2", "SHA2", "SHA-256", "SHA256",
                                 "SHA-3", "SHA3"):
            raise _bad(node, value, f"{part!r} is not SHA-1, SHA-2 or SHA-3")
    return HashAlg.SHA256


OID_TEMPLATE_NAME = "1.3.6.1.4.1.311.20.2"  # szOID_ENROLL_CERTTYPE_EXTENSION (BMPString)
OID_NAME_VALUE_PAIR = "1.3.6.1.4.1.311.13.2.1"  # szOID_ENROLLMENT_NAME_VALUE_PAIR
OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"  # noqa: S105 - an OID, not a password
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"


def _bmp(text: str) -> bytes:
    return tlv(0x1E, text.encode("utf-16-be"))  # BMPString (UCS-2 big-endian)


# --- the request ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CsrRequest:
    """What goes into the PKCS#10, in Install-node terms (all optional but the subject)."""

    subject: str = ""
    subject_alt_names: str = ""
    key_usage: int | str | None = None  # CERT_*_KEY_USAGE bits (decimal text from Install)
    eku: str = ""
    template_name: str = ""
    valid_period: str = ""
    valid_period_units: int | str = ""
    hash_algorithm: str = ""
    challenge: str = field(default="", repr=False)  # a secret: never in repr or logs


def validate_request(req: CsrRequest) -> None:
    """Check every Install value before a key is made for them (raises the PeerError
    build_csr would raise): a bad profile must not cost a TPM key."""
    _encode(req)


def _encode(req: CsrRequest) -> tuple[bytes, bytes, HashAlg]:
    """(subject Name, [0] attributes, CSR hash) of a request, everything but the key."""
    name = subject_der(req.subject)
    exts: list[bytes] = []
    if req.subject_alt_names.strip():
        sans = parse_sans(req.subject_alt_names)
        if sans:
            # critical when the subject is empty (RFC 5280 §4.2.1.6)
            exts.append(extension("2.5.29.17", seq(*sans), critical=name == seq()))
    if req.key_usage is not None:
        exts.append(key_usage_extension(parse_key_usage(req.key_usage)))
    if req.eku.strip():
        exts.append(extension("2.5.29.37", seq(*(oid(o) for o in parse_eku(req.eku)))))
    if req.template_name.strip():
        template = req.template_name.strip()
        if any(ord(ch) > 0xFFFF for ch in template):
            raise _bad("TemplateName", template, "BMPString holds only characters of the "
                                                 "Basic Multilingual Plane")
        exts.append(extension(OID_TEMPLATE_NAME, _bmp(template)))
    attrs: list[bytes] = []
    if req.challenge:
        attrs.append(seq(oid(OID_CHALLENGE_PASSWORD), set_of([directory_string(req.challenge)])))
    if exts:
        attrs.append(seq(oid(OID_EXTENSION_REQUEST), set_of([seq(*exts)])))
    validity = parse_valid_period(req.valid_period, req.valid_period_units)
    if validity is not None:
        unit, count = validity
        # MS-WCCE §2.2.2.7.10: one value, EnrollmentNameValuePairs ::= SEQUENCE OF
        # EnrollmentNameValuePair { name BMPString, value BMPString }; the CA honours it only
        # when its policy allows (EDITF_ATTRIBUTEENDDATE) - the CA decides.
        pairs = seq(seq(_bmp("ValidityPeriod"), _bmp(unit.value)),
                    seq(_bmp("ValidityPeriodUnits"), _bmp(str(count))))
        attrs.append(seq(oid(OID_NAME_VALUE_PAIR), set_of([pairs])))
    hash_alg = csr_hash(req.hash_algorithm) if req.hash_algorithm else HashAlg.SHA256
    return name, tlv(0xA0, *sorted(attrs)), hash_alg


def build_csr(req: CsrRequest, handle: KeyHandle) -> bytes:
    """DER CertificationRequest (RFC 2986) for `handle`'s key, signed through the handle."""
    from cryptography.hazmat.primitives import serialization

    name, attrs, hash_alg = _encode(req)
    spki = handle.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    info = seq(b"\x02\x01\x00", name, spki, attrs)
    signature = handle.sign(info, hash_alg)
    if handle.spec.algorithm is KeyAlgorithm.EC:
        alg = seq(oid({HashAlg.SHA256: "1.2.840.10045.4.3.2", HashAlg.SHA384:
                       "1.2.840.10045.4.3.3", HashAlg.SHA512: "1.2.840.10045.4.3.4"}[hash_alg]))
    else:
        alg = seq(oid({HashAlg.SHA256: "1.2.840.113549.1.1.11", HashAlg.SHA384:
                       "1.2.840.113549.1.1.12", HashAlg.SHA512:
                       "1.2.840.113549.1.1.13"}[hash_alg]), b"\x05\x00")
    return seq(info, alg, tlv(0x03, b"\x00", signature))
