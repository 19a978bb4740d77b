"""Pick the key store for ClientCertificateInstall/SCEP/<UniqueID>/Install/KeyProtection.

The CSP's values (Microsoft ClientCertificateInstall CSP documentation):
1 = private key protected by the TPM, enrollment fails when there is none;
2 = TPM when present, else the software KSP;
3 = software KSP (the default when the node is absent);
4 = Windows Hello for Business (Passport KSP) - not something this agent can provide.

"Present" means a TCTI is configured *and* the TPM answers a TPM2_GetCapability within
`probe_timeout` seconds: a configured swtpm that is down is "absent", not a hang.
"""

from __future__ import annotations

import enum
from pathlib import Path

from keystores.base import (
    E_INVALIDARG,
    KeyStore,
    KeyStoreError,
    Sealing,
    TpmUnavailableError,
    UnsupportedKeyError,
)
from keystores.software import SoftwareKeyStore


class KeyProtection(enum.IntEnum):
    TPM_REQUIRED = 1
    TPM_PREFERRED = 2
    SOFTWARE = 3
    PASSPORT = 4  # Windows Hello for Business

    @property
    def provider_name(self) -> str:
        """The KSP name Windows logs (event 36) for this choice."""
        return _PROVIDERS[self]


_PROVIDERS = {
    KeyProtection.TPM_REQUIRED: "Microsoft Platform Crypto Provider",
    KeyProtection.TPM_PREFERRED: "Microsoft Platform Crypto Provider",
    KeyProtection.SOFTWARE: "Microsoft Software Key Storage Provider",
    KeyProtection.PASSPORT: "Microsoft Passport Key Storage Provider",
}

# The KSP name of a store by its `kind` (what was actually used, e.g. after a fallback).
PROVIDER_NAMES = {"tpm": "Microsoft Platform Crypto Provider",
                  "software": "Microsoft Software Key Storage Provider"}

DEFAULT_KEY_PROTECTION = KeyProtection.SOFTWARE


def select_keystore(key_protection: int, *, tpm_tcti: str | None, software_dir: Path,
                    tpm_dir: Path, sealing: Sealing, probe_timeout: float = 2.0) -> KeyStore:
    """The store for `key_protection`; raises with the HRESULT Windows reports otherwise.

    Blocking (the TPM probe): async callers use `asyncio.to_thread`.
    """
    try:
        choice = KeyProtection(key_protection)
    except ValueError:
        raise KeyStoreError(
            f"KeyProtection {key_protection} is not a valid value",
            hresult=E_INVALIDARG,
            advice="use 1 (TPM required), 2 (TPM if present), 3 (software) or "
                   "4 (Windows Hello, not supported)") from None
    if choice is KeyProtection.SOFTWARE:
        return SoftwareKeyStore(software_dir, sealing)
    if choice is KeyProtection.PASSPORT:
        raise UnsupportedKeyError(
            "KeyProtection 4 (Windows Hello for Business / Passport KSP) is not supported "
            "by this agent",
            advice="use KeyProtection 1 or 2 for a TPM key, or 3 for a software key")
    try:
        return _tpm_store(tpm_tcti, tpm_dir, probe_timeout)
    except TpmUnavailableError:
        if choice is KeyProtection.TPM_REQUIRED:
            raise
        return SoftwareKeyStore(software_dir, sealing)


def _tpm_store(tcti: str | None, directory: Path, timeout: float) -> KeyStore:
    # Imported here: tpm2-pytss is optional and its absence is itself "no TPM".
    from keystores.tpm import TpmKeyStore, probe_tpm

    probe_tpm(tcti or "", timeout)
    return TpmKeyStore(tcti or "", directory)
