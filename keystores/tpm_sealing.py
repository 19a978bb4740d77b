"""TPM sealing: the `Sealing` protocol with the secret bound to this TPM (DPAPI's TPM analog).

`TpmSealer.seal` makes a fresh 256-bit AES key, seals it in a keyedhash data object under the
owner SRK (TPM2_Create with the key as sensitive data: a TPM 2.0 "sealed data object"), and
encrypts the plaintext with AES-256-GCM under it, the *purpose* as associated data (as
`agent.sealing` does, so a blob moved to another purpose does not unseal). The blob is
self-contained:

    b"DMT1" || u16 len || TPM2B_PUBLIC || u16 len || TPM2B_PRIVATE || nonce(12) || ciphertext+tag

`unseal` loads the object, TPM2_Unseal gives the AES key back, and the object is flushed. Only
this TPM (same owner seed) can load the object, so a blob copied to another machine, or kept
across a TPM clear, does not unseal. The agent uses it to keep its machine key sealed by the TPM.
"""

from __future__ import annotations

import secrets
import struct
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keystores.base import NTE_BAD_DATA, KeyStoreError, TpmUnavailableError
from keystores.tpm_session import TpmConnection, TSS2_Exception, require_tss

MAGIC: Final = b"DMT1"
_NONCE_LEN: Final = 12


def _sealed_template() -> Any:
    from tpm2_pytss import (
        TPM2_ALG,
        TPMA_OBJECT,
        TPMS_KEYEDHASH_PARMS,
        TPMT_KEYEDHASH_SCHEME,
        TPMT_PUBLIC,
        TPMU_PUBLIC_PARMS,
    )

    # No sensitiveDataOrigin (the data comes from us), no sign/decrypt: a pure data object.
    attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.NODA)
    return TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
        authPolicy=b"", parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS(
            scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL))))


class TpmSealer:
    """Seal small secrets to the TPM at `tcti` (implements `keystores.base.Sealing`).

    `directory` is accepted for symmetry with the key stores and is not written to: every
    blob carries its own TPM object, so nothing else needs to be kept.
    """

    def __init__(self, tcti: str, directory: Path | None = None) -> None:
        require_tss()
        self._conn = TpmConnection(tcti)
        self._dir = directory

    def __repr__(self) -> str:
        return f"TpmSealer({self._conn.tcti!r})"

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        from tpm2_pytss import TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE

        aes_key = AESGCM.generate_key(bit_length=256)
        sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=aes_key))
        with self._conn.session("TPM2_Create (seal)") as ectx:
            public, private = self._conn.create(ectx, _sealed_template(), sensitive)
        pub, priv = bytes(public.marshal()), bytes(private.marshal())
        nonce = secrets.token_bytes(_NONCE_LEN)
        ct = AESGCM(aes_key).encrypt(nonce, plaintext, purpose.encode())
        return (MAGIC + struct.pack(">H", len(pub)) + pub + struct.pack(">H", len(priv)) + priv
                + nonce + ct)

    def unseal(self, blob: bytes, purpose: str) -> bytes:
        from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC

        try:
            if not blob.startswith(MAGIC):
                raise ValueError("not in the DMT1 format")
            off = len(MAGIC)
            (n,) = struct.unpack_from(">H", blob, off)
            public, _ = TPM2B_PUBLIC.unmarshal(blob[off + 2: off + 2 + n])
            off += 2 + n
            (n,) = struct.unpack_from(">H", blob, off)
            private, _ = TPM2B_PRIVATE.unmarshal(blob[off + 2: off + 2 + n])
            off += 2 + n
            nonce, ct = blob[off: off + _NONCE_LEN], blob[off + _NONCE_LEN:]
            if len(nonce) != _NONCE_LEN or len(ct) < 16:
                raise ValueError("truncated")
        except (ValueError, struct.error, TSS2_Exception) as exc:
            raise KeyStoreError(f"TPM-sealed value is damaged: {exc}",
                                hresult=NTE_BAD_DATA) from None
        try:
            with self._conn.session("TPM2_Unseal") as ectx:
                sensitive = self._conn.with_loaded(ectx, public, private, ectx.unseal)
        except TpmUnavailableError:
            raise
        except KeyStoreError as exc:
            raise KeyStoreError(
                f"TPM-sealed value does not unseal in the TPM at {self._conn.tcti!r}: "
                f"{exc.message}", hresult=NTE_BAD_DATA,
                advice="it was sealed by another TPM or before the TPM was cleared") from None
        try:
            return AESGCM(bytes(sensitive)).decrypt(nonce, ct, purpose.encode())
        except InvalidTag:
            raise KeyStoreError("TPM-sealed value does not unseal: damaged or sealed for "
                                "another purpose", hresult=NTE_BAD_DATA) from None
