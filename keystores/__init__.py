"""Key stores: where the device's private keys live (software KSP or TPM).

`keystores.tpm` is imported on demand (it needs tpm2-pytss and libtss2); `select_keystore`
in `keystores.selection` picks a store from ClientCertificateInstall's KeyProtection.
"""

from keystores.base import (
    HashAlg,
    KeyAlgorithm,
    KeyHandle,
    KeyNotFoundError,
    KeySpec,
    KeyStore,
    KeyStoreError,
    Padding,
    PublicKey,
    Sealing,
    TpmUnavailableError,
    UnsupportedKeyError,
    key_id_for,
)
from keystores.selection import KeyProtection, select_keystore
from keystores.software import SoftwareKeyStore

__all__ = [
    "HashAlg",
    "KeyAlgorithm",
    "KeyHandle",
    "KeyNotFoundError",
    "KeyProtection",
    "KeySpec",
    "KeyStore",
    "KeyStoreError",
    "Padding",
    "PublicKey",
    "Sealing",
    "SoftwareKeyStore",
    "TpmUnavailableError",
    "UnsupportedKeyError",
    "key_id_for",
    "select_keystore",
]
