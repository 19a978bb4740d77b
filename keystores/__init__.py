"""Key stores: where the device's private keys live (software KSP or TPM).

`keystores.tpm` is imported on demand (it needs tpm2-pytss and libtss2); `select_keystore`
in `keystores.selection` picks a store from ClientCertificateInstall's KeyProtection.

The names below are loaded on first use (PEP 562), so importing a light submodule such as
`keystores.keygen` does not load the whole package: `dmagent scep enroll` starts making its
key before the rest of the key-store code is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    **dict.fromkeys(("HashAlg", "KeyAlgorithm", "KeyHandle", "KeyNotFoundError", "KeySpec",
                     "KeyStore", "KeyStoreError", "Padding", "PublicKey", "Sealing",
                     "TpmUnavailableError", "UnsupportedKeyError", "key_id_for"),
                    "keystores.base"),
    "KeyProtection": "keystores.selection",
    "select_keystore": "keystores.selection",
    "SoftwareKeyStore": "keystores.software",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value
