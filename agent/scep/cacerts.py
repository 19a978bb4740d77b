"""GetCACert replies (RFC 8894 §4.2.1): the CA/RA certificates, their roles, CAThumbprint.

Sans-IO. A CA without an RA answers one DER certificate (application/x-x509-ca-cert); a CA
with RAs answers a degenerate PKCS#7 (application/x-x509-ca-ra-cert). NDES returns two RA
certificates, one for encryption (keyEncipherment) and one for signing (digitalSignature), so
roles are chosen by key usage, not by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.scep.certificate import (
    DATA_ENCIPHERMENT,
    DIGITAL_SIGNATURE,
    KEY_ENCIPHERMENT,
    Certificate,
    as_certificate,
    names_equal,
)

if TYPE_CHECKING:
    from agent.scep.certificate import CertificateLike

CT_CA_CERT = "application/x-x509-ca-cert"
CT_CA_RA_CERT = "application/x-x509-ca-ra-cert"


def thumbprint(cert: CertificateLike) -> str:
    """SHA-1 over the DER certificate, upper-case hex: what CAThumbprint and Windows show."""
    return as_certificate(cert).thumbprint


def normalize_thumbprint(text: str) -> str:
    """Accept `ab cd ...`, `AB:CD...` and mixed case; CAThumbprint is case/space-insensitive."""
    cleaned = "".join(ch for ch in text if ch not in " \t\r\n:\u200e\u200f").upper()
    return cleaned


@dataclass(frozen=True)
class CaCertificates:
    """The GetCACert answer with the role of each certificate decided."""

    certificates: tuple[Certificate, ...]
    ca: Certificate  # the issuing CA
    encryption: Certificate  # where request envelopes are encrypted to
    signers: tuple[Certificate, ...]  # who may sign CertReps
    has_ra: bool

    @property
    def thumbprints(self) -> tuple[str, ...]:
        return tuple(c.thumbprint for c in self.certificates)


def _is_ca(cert: Certificate) -> bool:
    ca = cert.is_ca
    if ca is None:
        # v1 certificates (old CAs) have no extensions: a self-signed one is a CA.
        return names_equal(cert.issuer_der, cert.subject_der)
    return ca


def _can_encrypt(cert: Certificate) -> bool:
    ku = cert.key_usage
    return ku is None or KEY_ENCIPHERMENT in ku or DATA_ENCIPHERMENT in ku


def _can_sign(cert: Certificate) -> bool:
    ku = cert.key_usage
    return ku is None or DIGITAL_SIGNATURE in ku


def parse_ca_certs(body: bytes, content_type: str = "") -> CaCertificates:
    """Decode a GetCACert body and assign the CA, encryption and signing roles."""
    from agent.scep import cms as scms

    ctype = content_type.split(";", maxsplit=1)[0].strip().lower()
    if not body:
        raise PeerError("GetCACert returned an empty body", hresult=HResult.CRYPT_E_ASN1_EOD)
    certs: list[Certificate] = []
    if ctype != CT_CA_RA_CERT:
        try:
            certs = [Certificate(body)]
        except ValueError as exc:
            if ctype == CT_CA_CERT:
                raise PeerError(f"GetCACert returned an invalid certificate: {exc}",
                                hresult=HResult.CRYPT_E_BAD_ENCODE) from None
    if not certs:  # x-x509-ca-ra-cert, or an unlabelled body that is not one certificate
        certs, _ = scms.certs_from_degenerate(body, "the GetCACert PKCS#7")
    if not certs:
        raise PeerError("GetCACert returned no certificate", hresult=HResult.CRYPT_E_NOT_FOUND)
    return assign_roles(certs)


def assign_roles(given: Sequence[CertificateLike]) -> CaCertificates:
    """Decide which certificate is the CA, which encrypts and which signs (RFC 8894 §4.2.1.2).

    RA certificates are the end-entity ones; when there are none the CA does everything.
    The issuing CA is the CA certificate that issued the RA (else the one that issued no
    other CA in the set: the bottom of the chain).
    """
    certs = [as_certificate(c) for c in given]
    cas = [c for c in certs if _is_ca(c)]
    ras = [c for c in certs if not _is_ca(c)]
    if not cas:
        # Some RAs send only their own certificate(s); treat the first as the CA stand-in.
        cas = [certs[0]]
    issuing = None
    if ras:
        issuing = next((ca for ca in cas if names_equal(ca.subject_der, ras[0].issuer_der)),
                       None)
    if issuing is None:
        issuers = [c.issuer_der for c in cas if not names_equal(c.issuer_der, c.subject_der)]
        bottom = [c for c in cas if not any(names_equal(c.subject_der, i) for i in issuers)]
        issuing = bottom[0] if bottom else cas[0]
    if ras:
        enc = [c for c in ras if _can_encrypt(c)]
        sig = [c for c in ras if _can_sign(c)]
        if not enc:
            raise PeerError("GetCACert returned RA certificates, but none may encrypt "
                            "(keyEncipherment/dataEncipherment)",
                            hresult=HResult.CERT_E_WRONG_USAGE)
        if not sig:
            raise PeerError("GetCACert returned RA certificates, but none may sign "
                            "(digitalSignature)", hresult=HResult.CERT_E_WRONG_USAGE)
        # Prefer an encryption cert that is not also the signing one (NDES's split pair).
        encryption = next((c for c in enc if not _can_sign(c)), enc[0])
        signers = tuple(sig) + tuple(c for c in cas if c not in sig)
        return CaCertificates(tuple(certs), issuing, encryption, signers, True)
    return CaCertificates(tuple(certs), issuing, issuing, (issuing, *[c for c in cas
                                                                       if c is not issuing]),
                          False)


def check_ca_thumbprint(ca: CaCertificates, expected: str, server_url: str) -> None:
    """Refuse to go on when CAThumbprint names none of the GetCACert certificates.

    The message mirrors Windows' event 307 text; the HRESULT is CERT_E_UNTRUSTEDCA.
    """
    if not expected.strip():
        return
    want = normalize_thumbprint(expected)
    if want in ca.thumbprints:
        return
    got = ", ".join(ca.thumbprints)
    raise PeerError(f"Failed to Initialize SCEP enrollment with NDES Server '{server_url}', "
                    f"CA cert thumbprint '{want}' and server certs '{got}'",
                    hresult=HResult.CERT_E_UNTRUSTEDCA,
                    advice="CAThumbprint must be the SHA-1 thumbprint of a certificate the "
                           "SCEP server returns from GetCACert; no request was sent")
