"""What a PKCS#10 request asks for, as the CA's policy needs it. Sans-IO.

RFC 2986 with the attributes SCEP and Windows put in it: challengePassword (PKCS#9, RFC 8894
§2.2), extensionRequest (SAN, key usage, EKU, and Microsoft's certificate template name
extension 1.3.6.1.4.1.311.20.2), and Microsoft's enrollment name/value pairs
(szOID_ENROLLMENT_NAME_VALUE_PAIR, 1.3.6.1.4.1.311.13.2.1), through which the Windows client
sends ValidityPeriod / ValidityPeriodUnits (the ValidPeriod Install nodes) and
CertificateTemplate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from asn1crypto import core
from asn1crypto import csr as acsr
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"  # noqa: S105 - an OID
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_NAME_VALUE_PAIR = "1.3.6.1.4.1.311.13.2.1"
OID_TEMPLATE_NAME_EXT = "1.3.6.1.4.1.311.20.2"  # szOID_ENROLL_CERTTYPE_EXTENSION (BMPString)

_PERIOD_DAYS = {"days": 1, "weeks": 7, "months": 30, "years": 365}


class CsrError(Exception):
    """The CSR is unusable. `bad_signature` tells badMessageCheck from badRequest."""

    def __init__(self, message: str, *, bad_signature: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.bad_signature = bad_signature


class _NameValuePair(core.Sequence):  # type: ignore[misc]
    _fields = [("name", core.BMPString), ("value", core.BMPString)]  # noqa: RUF012


class _AnySet(core.SetOf):  # type: ignore[misc]
    _child_spec = core.Any


class _PairSequence(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _NameValuePair


def _name_value_pairs(values: core.Asn1Value) -> list[tuple[str, str]]:
    """The attribute's values: each one either an EnrollmentNameValuePair or, as MS-WCCE
    §2.2.2.7.10 has it, a SEQUENCE OF them (certreq sends the latter; both are seen)."""
    if isinstance(values, core.Any):  # asn1crypto does not know this attribute
        values = values.parse(_AnySet)
    out: list[tuple[str, str]] = []
    for value in values:
        raw = value.dump()
        # SEQUENCE { BMPString, … } is one pair; SEQUENCE { SEQUENCE, … } is a list.
        inner_tag = raw[2 if raw[1] < 0x80 else 2 + (raw[1] & 0x7F)] if len(raw) > 2 else 0
        items = [_NameValuePair.load(raw)] if inner_tag == 0x1E else _PairSequence.load(raw)
        out.extend((str(p["name"].native), str(p["value"].native)) for p in items)
    return out


@dataclass(frozen=True)
class CsrInfo:
    der: bytes
    csr: x509.CertificateSigningRequest
    challenge: str | None
    san: x509.SubjectAlternativeName | None
    key_usage: x509.KeyUsage | None
    ekus: tuple[str, ...] | None
    template_name: str | None
    requested_validity: timedelta | None
    name_value_pairs: tuple[tuple[str, str], ...]

    @property
    def subject(self) -> x509.Name:
        return self.csr.subject

    @property
    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        key = self.csr.public_key()
        assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return key

    @property
    def key_size(self) -> int:
        return self.public_key.key_size

    def names(self) -> set[str]:
        """Subject CN values and SAN values, lower-cased (for renewal name matching)."""
        out = {str(a.value).lower() for a in self.subject}
        if self.san is not None:
            out |= {str(v).lower() for v in _san_values(self.san)}
        return out


def _san_values(san: x509.SubjectAlternativeName) -> list[object]:
    values: list[object] = []
    for gn in san:
        values.append(gn.value if not isinstance(gn, x509.OtherName) else gn.value.hex())
    return values


def cert_names(cert: x509.Certificate) -> set[str]:
    out = {str(a.value).lower() for a in cert.subject}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return out
    return out | {str(v).lower() for v in _san_values(san)}


def _directory_string(value: core.Asn1Value) -> str | None:
    native = value.native
    if isinstance(native, str):
        return native
    if isinstance(native, bytes):
        return native.decode("utf-8", "replace")
    return None


def parse_validity(pairs: tuple[tuple[str, str], ...]) -> timedelta | None:
    """ValidityPeriod (Days/Weeks/Months/Years) × ValidityPeriodUnits, as certreq sends them."""
    values = {k.lower(): v for k, v in pairs}
    period = values.get("validityperiod", "").strip().lower()
    units = values.get("validityperiodunits", "").strip()
    if not period or not units:
        return None
    if period not in _PERIOD_DAYS and period.rstrip("s") + "s" not in _PERIOD_DAYS:
        raise CsrError(f"unknown ValidityPeriod {values['validityperiod']!r} "
                       "(Days, Weeks, Months, Years)")
    try:
        count = int(units)
    except ValueError:
        raise CsrError(f"ValidityPeriodUnits {units!r} is not a number") from None
    if count <= 0:
        raise CsrError(f"ValidityPeriodUnits must be positive, not {count}")
    per = _PERIOD_DAYS.get(period, _PERIOD_DAYS.get(period.rstrip("s") + "s", 1))
    return timedelta(days=per * count)


def parse_csr(der: bytes) -> CsrInfo:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise CsrError(f"the message data is not a PKCS#10 request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # unsupported signature algorithm and the like
        raise CsrError(f"the CSR signature cannot be checked: {exc}", bad_signature=True) \
            from None
    if not valid:
        raise CsrError("the CSR's signature does not verify with its public key",
                       bad_signature=True)
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CsrError(f"the CSR's public key is not usable: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise CsrError(f"{type(key).__name__} keys are not accepted (RSA and ECDSA are)")

    challenge: str | None = None
    pairs: list[tuple[str, str]] = []
    try:
        info = acsr.CertificationRequest.load(der)["certification_request_info"]
        for attr in info["attributes"]:
            oid = attr["type"].dotted
            if oid == OID_CHALLENGE_PASSWORD:
                for value in attr["values"]:
                    challenge = _directory_string(value)
            elif oid == OID_NAME_VALUE_PAIR:
                pairs.extend(_name_value_pairs(attr["values"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise CsrError(f"the CSR attributes are malformed: {exc}") from None

    try:
        exts = csr.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise CsrError(f"the CSR's extension request is malformed: {exc}") from None
    san = ku = None
    ekus: tuple[str, ...] | None = None
    template: str | None = None
    for ext in exts:
        if isinstance(ext.value, x509.SubjectAlternativeName):
            san = ext.value
        elif isinstance(ext.value, x509.KeyUsage):
            ku = ext.value
        elif isinstance(ext.value, x509.ExtendedKeyUsage):
            ekus = tuple(o.dotted_string for o in ext.value)
        elif ext.oid.dotted_string == OID_TEMPLATE_NAME_EXT and isinstance(
                ext.value, x509.UnrecognizedExtension):
            try:
                template = str(core.BMPString.load(ext.value.value).native)
            except (ValueError, TypeError):
                template = None
    for name, value in pairs:
        if name.lower() == "certificatetemplate" and not template:
            template = value.strip()
    return CsrInfo(der=der, csr=csr, challenge=challenge, san=san, key_usage=ku, ekus=ekus,
                   template_name=template or None,
                   requested_validity=parse_validity(tuple(pairs)),
                   name_value_pairs=tuple(pairs))
