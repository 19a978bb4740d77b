"""The lab CA's keys and certificates: a self-signed RSA-2048 root that issues from CSRs.

`init` creates, in one directory, the root CA and the two RA certificates NDES mode uses (NDES
holds an "Exchange Enrollment Agent (Offline request)" certificate that signs CertReps and a
"CEP Encryption" certificate that requests are encrypted to; both carry the same subject, the
host's `<name>-MSCEP-RA`, and differ by key usage). Keys are plain PEM files, 0600: this is a
lab CA, not a production one. Issuance and CRLs are pure functions of their inputs and the
clock passed in; the database of what was issued is `lab.scepca.db`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keystores.base import KeyAlgorithm, KeySpec, key_id_for
from keystores.software import SoftwareKeyHandle

CA_FILES = {"ca": "ca", "ra_sign": "ra-sign", "ra_enc": "ra-enc"}
CA_VALIDITY = timedelta(days=3650)
RA_VALIDITY = timedelta(days=730)


class CAError(Exception):
    """The CA directory is missing, incomplete or damaged."""


def random_serial() -> int:
    """A positive 159-bit serial (RFC 5280 §4.1.2.2: at most 20 octets, positive)."""
    return secrets.randbits(159) | (1 << 64)  # never tiny, never zero


def sha1_thumbprint(cert: x509.Certificate) -> str:
    """What Windows calls the thumbprint (and CAThumbprint carries): SHA-1, upper-case hex."""
    return hashlib.sha1(  # noqa: S324 - a name for the certificate, not a security check
        cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


def key_handle(key: rsa.RSAPrivateKey, label: str = "") -> SoftwareKeyHandle:
    """Wrap a CA/RA key so the agent's CMS functions (which sign and decrypt through a
    `KeyHandle`) can use it."""
    return SoftwareKeyHandle(key_id_for(key.public_key()),
                             KeySpec(KeyAlgorithm.RSA, key.key_size, label=label), key)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _ku(*, digital_signature: bool = False, key_encipherment: bool = False,
        key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False,
                         key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
                         encipher_only=False, decipher_only=False)


@dataclass(frozen=True)
class IssuePlan:
    """Everything the issued certificate will hold; decided by the service's policy."""

    subject: x509.Name
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    serial: int
    not_before: datetime
    not_after: datetime
    key_usage: x509.KeyUsage | None
    ekus: tuple[str, ...]
    san: x509.SubjectAlternativeName | None


@dataclass(frozen=True)
class KeyPair:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def handle(self) -> SoftwareKeyHandle:
        return key_handle(self.key, self.cert.subject.rfc4514_string())


class CertificateAuthority:
    """The root CA plus its RA pair, loaded from (or created in) one directory."""

    def __init__(self, directory: Path, ca: KeyPair, ra_sign: KeyPair, ra_enc: KeyPair) -> None:
        self.directory = directory
        self.ca = ca
        self.ra_sign = ra_sign
        self.ra_enc = ra_enc

    @property
    def cert(self) -> x509.Certificate:
        return self.ca.cert

    @property
    def thumbprint(self) -> str:
        return sha1_thumbprint(self.ca.cert)

    @property
    def db_path(self) -> Path:
        return self.directory / "ca.db"

    # --- creation and loading ---------------------------------------------------------

    @staticmethod
    def exists(directory: Path) -> bool:
        return all((directory / f"{n}.pem").exists() and (directory / f"{n}.key.pem").exists()
                   for n in CA_FILES.values())

    @classmethod
    def init(cls, directory: Path, *, now: datetime, common_name: str = "dmagent Lab Root CA",
             ra_name: str = "LAB-NDES-MSCEP-RA", organization: str = "dmagent lab",
             key_size: int = 2048, force: bool = False) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cls.exists(directory) and not force:
            raise CAError(f"a CA already exists in {directory} (use force to replace it)")
        start = now - timedelta(minutes=5)
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        # DER order most significant first (O, then CN); shown reversed, "CN=…, O=…".
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                             x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        # The root also signs CertReps and decrypts requests in normal mode (it is its own
        # RA, as micromdm's CA is), so it carries digitalSignature and keyEncipherment.
        ca_cert = (x509.CertificateBuilder()
                   .subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(random_serial())
                   .not_valid_before(start).not_valid_after(start + CA_VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .add_extension(_ku(digital_signature=True, key_encipherment=True,
                                      key_cert_sign=True, crl_sign=True), True)
                   .add_extension(ski, False)
                   .sign(ca_key, hashes.SHA256()))
        ca = KeyPair(ca_cert, ca_key)
        ra_subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                                x509.NameAttribute(NameOID.COMMON_NAME, ra_name)])
        ra_sign = cls._make_ra(ca, ra_subject, start, signing=True, key_size=key_size)
        ra_enc = cls._make_ra(ca, ra_subject, start, signing=False, key_size=key_size)
        for attr, pair in (("ca", ca), ("ra_sign", ra_sign), ("ra_enc", ra_enc)):
            base = CA_FILES[attr]
            _write_private(directory / f"{base}.key.pem", pair.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            _write_private(directory / f"{base}.pem",
                           pair.cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, ca, ra_sign, ra_enc)

    @staticmethod
    def _make_ra(ca: KeyPair, subject: x509.Name, start: datetime, *, signing: bool,
                 key_size: int) -> KeyPair:
        key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        # NDES' RA templates: "Exchange Enrollment Agent (Offline request)" (signature,
        # EKU certificateRequestAgent) and "CEP Encryption" (key encipherment).
        ku = _ku(digital_signature=True) if signing else _ku(key_encipherment=True)
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(ca.cert.subject)
                .public_key(key.public_key()).serial_number(random_serial())
                .not_valid_before(start).not_valid_after(start + RA_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                .add_extension(ku, True)
                .add_extension(x509.ExtendedKeyUsage(
                    [x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.1")]  # certificateRequestAgent
                    if signing else [ExtendedKeyUsageOID.CLIENT_AUTH]), False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               False)
                .add_extension(_aki(ca.cert), False)
                .sign(ca.key, hashes.SHA256()))
        return KeyPair(cert, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        if not cls.exists(directory):
            raise CAError(f"no CA in {directory}: run `python -m lab.scepca init --dir "
                          f"{directory}` first")
        pairs: dict[str, KeyPair] = {}
        for attr, base in CA_FILES.items():
            try:
                cert = x509.load_pem_x509_certificate((directory / f"{base}.pem").read_bytes())
                # The keys are ours (written by init): skip the slow RSA consistency check.
                key = serialization.load_pem_private_key(
                    (directory / f"{base}.key.pem").read_bytes(), password=None,
                    unsafe_skip_rsa_key_validation=True)
            except (OSError, ValueError) as exc:
                raise CAError(f"cannot load {base} from {directory}: {exc}") from None
            if not isinstance(key, rsa.RSAPrivateKey):
                raise CAError(f"{base}.key.pem is not an RSA key")
            pairs[attr] = KeyPair(cert, key)
        return cls(directory, pairs["ca"], pairs["ra_sign"], pairs["ra_enc"])

    # --- issuance ---------------------------------------------------------------------

    def issue(self, plan: IssuePlan) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(plan.subject).issuer_name(self.ca.cert.subject)
                   .public_key(plan.public_key)
                   .serial_number(plan.serial)
                   .not_valid_before(plan.not_before).not_valid_after(plan.not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                       plan.public_key), False)
                   .add_extension(_aki(self.ca.cert), False))
        if plan.key_usage is not None:
            builder = builder.add_extension(plan.key_usage, True)
        if plan.ekus:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([x509.ObjectIdentifier(o) for o in plan.ekus]), False)
        if plan.san is not None:
            # RFC 5280 §4.2.1.6: critical when the subject is empty.
            builder = builder.add_extension(plan.san, critical=len(plan.subject) == 0)
        return builder.sign(self.ca.key, hashes.SHA256())

    def crl(self, revoked: list[tuple[int, datetime]], *, now: datetime,
            next_update: timedelta = timedelta(days=7)) -> x509.CertificateRevocationList:
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.ca.cert.subject)
                   .last_update(now).next_update(now + next_update)
                   .add_extension(_aki(self.ca.cert), False)
                   .add_extension(x509.CRLNumber(int(now.timestamp())), False))
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(when).build())
        return builder.sign(self.ca.key, hashes.SHA256())

    def issued_by_us(self, cert: x509.Certificate) -> bool:
        """True when `cert` carries this CA's signature (not merely its issuer name)."""
        if cert.issuer != self.ca.cert.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
