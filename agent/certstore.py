"""Certificate stores (My, CA, Root) per scope, kept where Windows keeps them: in the registry.

Device scope: `HKLM\\SOFTWARE\\Microsoft\\SystemCertificates\\<STORE>\\Certificates\\<SHA1>`;
user scope: `HKCU\\Software\\Microsoft\\SystemCertificates\\<STORE>\\Certificates\\<SHA1>`.
Each certificate key holds `Blob` (REG_BINARY: the DER certificate — Windows serialises a
certificate context with properties there; plain DER keeps it readable by any tool) and, for
certificates with a private key, the link to it: `KeyId` and `KeyStore` (software | tpm), as
the CERT_KEY_PROV_INFO property links a Windows certificate to its KSP container. `UniqueID`
ties a certificate to the ClientCertificateInstall node that enrolled it.

Because the store lives in the registry, adding a certificate joins whatever transaction the
caller holds: the enrollment job installs the certificate and writes CertThumbprint/Status in
one commit, so a crash never leaves one without the other.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from cryptography import x509

from agent.errors import LocalError, NotFoundError
from agent.registry import Registry, RegType


class Scope(enum.StrEnum):
    DEVICE = "device"  # LocalMachine
    USER = "user"  # CurrentUser


class StoreName(enum.StrEnum):
    MY = "My"  # personal: certificates with a private key
    CA = "CA"  # intermediate certification authorities
    ROOT = "Root"  # trusted root certification authorities


_ROOTS = {Scope.DEVICE: r"HKLM\SOFTWARE\Microsoft\SystemCertificates",
          Scope.USER: r"HKCU\Software\Microsoft\SystemCertificates"}


def thumbprint(der: bytes) -> str:
    """The certificate's SHA-1 thumbprint, upper-case hex, as Windows shows it."""
    return hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - thumbprints are SHA-1 by definition


def store_key(scope: Scope, store: StoreName) -> str:
    return f"{_ROOTS[scope]}\\{store.value.upper()}\\Certificates"


@dataclass(frozen=True)
class StoredCert:
    scope: Scope
    store: StoreName
    thumbprint: str
    der: bytes
    key_id: str = ""
    key_store: str = ""
    unique_id: str = ""

    @cached_property
    def cert(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        return self.cert.issuer.rfc4514_string()

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:x}"

    def summary(self) -> dict[str, str]:
        return {"scope": self.scope.value, "store": self.store.value,
                "thumbprint": self.thumbprint, "subject": self.subject, "issuer": self.issuer,
                "serial": self.serial, "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(), "key_id": self.key_id,
                "key_store": self.key_store, "unique_id": self.unique_id}


class CertStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def add(self, scope: Scope, store: StoreName, der: bytes, *, key_id: str = "",
            key_store: str = "", unique_id: str = "") -> StoredCert:
        """Add (or replace) a certificate; returns what was stored."""
        try:
            x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise LocalError(f"not a DER certificate: {exc}") from None
        tp = thumbprint(der)
        key = f"{store_key(scope, store)}\\{tp}"
        with self.registry.transaction():
            self.registry.delete_key(key)  # replacing drops stale link values
            self.registry.set_value(key, "Blob", RegType.REG_BINARY, der)
            for name, value in (("KeyId", key_id), ("KeyStore", key_store),
                                ("UniqueID", unique_id)):
                if value:
                    self.registry.set_sz(key, name, value)
        return StoredCert(scope, store, tp, der, key_id, key_store, unique_id)

    def get(self, scope: Scope, store: StoreName, tp: str) -> StoredCert:
        cert = self._read(scope, store, normalize_thumbprint(tp))
        if cert is None:
            raise NotFoundError(f"no certificate {tp} in the {scope.value} {store.value} store",
                                advice="`dmagent certs list` shows what is installed")
        return cert

    def find(self, tp: str) -> StoredCert:
        """A certificate by thumbprint in any scope and store (My first)."""
        tp = normalize_thumbprint(tp)
        for scope in Scope:
            for store in StoreName:
                try:
                    cert = self._read(scope, store, tp)
                except LocalError:  # no user configured: HKCU unavailable
                    continue
                if cert is not None:
                    return cert
        raise NotFoundError(f"no certificate with thumbprint {tp}")

    def list_store(self, scope: Scope, store: StoreName) -> list[StoredCert]:
        base = store_key(scope, store)
        if not self.registry.key_exists(base):
            return []
        out = []
        for tp in self.registry.subkeys(base):
            cert = self._read(scope, store, tp)
            if cert is not None:
                out.append(cert)
        return out

    def by_unique_id(self, scope: Scope, unique_id: str) -> list[StoredCert]:
        return [c for c in self.list_store(scope, StoreName.MY) if c.unique_id.upper() ==
                unique_id.upper()]

    def delete(self, scope: Scope, store: StoreName, tp: str) -> bool:
        return self.registry.delete_key(f"{store_key(scope, store)}\\{normalize_thumbprint(tp)}")

    def _read(self, scope: Scope, store: StoreName, tp: str) -> StoredCert | None:
        key = f"{store_key(scope, store)}\\{tp}"
        blob = self.registry.query(key, "Blob")
        if not isinstance(blob, bytes):
            return None

        def sz(name: str) -> str:
            value = self.registry.query(key, name)
            return value if isinstance(value, str) else ""

        return StoredCert(scope, store, thumbprint(blob), blob, sz("KeyId"), sz("KeyStore"),
                          sz("UniqueID"))


def normalize_thumbprint(tp: str) -> str:
    """Accept thumbprints with spaces/colons and any case, as people paste them."""
    cleaned = "".join(ch for ch in tp if ch not in " :").upper()
    if len(cleaned) != 40 or any(ch not in "0123456789ABCDEF" for ch in cleaned):
        raise LocalError(f"not a SHA-1 thumbprint: {tp!r}")
    return cleaned
