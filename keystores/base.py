"""The key store seam: where the device's private keys are made and used.

The CSR, SCEP and CMS code use only this interface, so a TPM key signs the CSR and the SCEP
SignedData and decrypts the CertRep envelope without the private key ever leaving the TPM.
`keystores` is the bottom layer: it imports nothing from `agent` (imports flow
service → agent → keystores); what it needs from above (sealing of passwords) is passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

PublicKey = RSAPublicKey | EllipticCurvePublicKey

# HRESULTs the key stores report (winerror.h); `agent.diagnostics` names the same values.
NTE_BAD_KEYSET = 0x80090016
NTE_NOT_SUPPORTED = 0x80090029
NTE_BAD_DATA = 0x80090005
NTE_INVALID_PARAMETER = 0x80090027
NTE_BAD_KEY_STATE = 0x8009000B  # "Key not valid for use in specified state" (export refused)
E_INVALIDARG = 0x80070057
TBS_E_TPM_NOT_FOUND = 0x8028400F
TPM_E_PCP_DEVICE_NOT_READY = 0x80290101


class KeyStoreError(Exception):
    """A key store failed. Carries the HRESULT the device reports and one line of advice."""

    def __init__(self, message: str, *, hresult: int = NTE_BAD_DATA, advice: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hresult = hresult
        self.advice = advice


class KeyNotFoundError(KeyStoreError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key with id {key_id!r} in this key store",
                         hresult=NTE_BAD_KEYSET)


class UnsupportedKeyError(KeyStoreError):
    """The store cannot make this kind of key (e.g. RSA-4096 on swtpm)."""

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message, hresult=NTE_NOT_SUPPORTED, advice=advice)


class TpmUnavailableError(KeyStoreError):
    """KeyProtection asks for a TPM and there is none (or it does not answer)."""

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message, hresult=TBS_E_TPM_NOT_FOUND, advice=advice)


class KeyAlgorithm(enum.StrEnum):
    RSA = "RSA"
    EC = "EC"


class HashAlg(enum.StrEnum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"


class Padding(enum.StrEnum):
    PKCS1V15 = "pkcs1v15"
    PSS = "pss"
    OAEP = "oaep"


# What ClientCertificateInstall can ask for (KeyLength 1024/2048/4096; ECDSA P-256/P-384).
RSA_SIZES: tuple[int, ...] = (1024, 2048, 4096)
EC_SIZES: tuple[int, ...] = (256, 384)


@dataclass(frozen=True)
class KeySpec:
    """What to create. `size` is the RSA modulus length or the EC curve size (256, 384)."""

    algorithm: KeyAlgorithm = KeyAlgorithm.RSA
    size: int = 2048
    exportable: bool = False
    label: str = ""  # ContainerName; informational


@runtime_checkable
class KeyHandle(Protocol):
    """A private key living in a key store."""

    @property
    def key_id(self) -> str: ...

    @property
    def spec(self) -> KeySpec: ...

    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes, hash_alg: HashAlg,
             padding: Padding = Padding.PKCS1V15) -> bytes:
        """Hash `data` with `hash_alg` and sign (RSA PKCS#1 v1.5 / PSS; ECDSA DER)."""
        ...

    def decrypt(self, ciphertext: bytes, padding: Padding = Padding.PKCS1V15,
                oaep_hash: HashAlg = HashAlg.SHA1) -> bytes:
        """RSA key transport decryption (CMS KeyTransRecipientInfo)."""
        ...

    def export_pkcs8(self, password: bytes) -> bytes:
        """The private key as encrypted PKCS#8 PEM; KeyStoreError(NTE_BAD_KEY_STATE) when the
        key is not exportable (always for TPM keys), like NCryptExportKey on Windows."""
        ...


@runtime_checkable
class KeyStore(Protocol):
    """Creates, finds and deletes keys. `kind` is "software" or "tpm"."""

    @property
    def kind(self) -> str: ...

    def check(self, spec: KeySpec) -> None:
        """Raise UnsupportedKeyError (before any work) when `spec` cannot be created here."""
        ...

    def create(self, spec: KeySpec) -> KeyHandle: ...

    def load(self, key_id: str) -> KeyHandle: ...

    def delete(self, key_id: str) -> None:
        """Delete the key; deleting a missing key is not an error (idempotent)."""
        ...

    def list_ids(self) -> list[str]: ...


class Sealing(Protocol):
    """What a key store needs to protect its secrets at rest (provided by `agent.sealing`)."""

    def seal(self, plaintext: bytes, purpose: str) -> bytes: ...

    def unseal(self, blob: bytes, purpose: str) -> bytes: ...


def check_spec_shape(spec: KeySpec) -> None:
    """Refuse sizes outside the interface (the same for every store) before any work."""
    if spec.algorithm is KeyAlgorithm.RSA and spec.size not in RSA_SIZES:
        raise UnsupportedKeyError(
            f"RSA-{spec.size} is not a supported key length",
            advice=f"use one of {', '.join(map(str, RSA_SIZES))} (KeyLength)")
    if spec.algorithm is KeyAlgorithm.EC and spec.size not in EC_SIZES:
        raise UnsupportedKeyError(
            f"ECDSA with a {spec.size}-bit curve is not supported",
            advice="use P-256 (256) or P-384 (384)")


def key_id_for(public_key: PublicKey) -> str:
    """A stable key id: the first 20 bytes of SHA-256 over the SubjectPublicKeyInfo, in hex."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())  # cryptography's: hashlib would load a 2nd libcrypto
    digest.update(spki)
    return digest.finalize().hex()[:40]
