"""Secrets at rest: the SCEP Challenge and key-store passwords are sealed, never stored in clear.

The Windows client protects the Challenge with DPAPI; here a 256-bit machine key kept 0600 in
the state dir plays that part (a TPM-sealed machine key replaces the file when a TPM is
configured). A sealed blob is `b"DMS1" || nonce(12) || AES-256-GCM(ciphertext || tag)`, with the
*purpose* (e.g. the registry value path) as associated data, so a blob copied to another value
does not unseal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.diagnostics import HResult
from agent.errors import LocalError

MAGIC: Final = b"DMS1"
_NONCE_LEN: Final = 12
MACHINE_KEY_FILE: Final = "machine.key"


class SealError(LocalError):
    """A sealed blob is damaged, was sealed for another purpose or under another machine key."""

    default_hresult = HResult.NTE_BAD_DATA


class Sealer:
    """AES-GCM sealing under one machine key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the machine key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> Sealer:
        return cls(load_or_create_machine_key(state_dir / MACHINE_KEY_FILE))

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = os.urandom(_NONCE_LEN)  # what secrets.token_bytes returns
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def unseal(self, blob: bytes, purpose: str) -> bytes:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _NONCE_LEN + 16:
            raise SealError("sealed value is not in the DMS1 format")
        nonce = blob[len(MAGIC): len(MAGIC) + _NONCE_LEN]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + _NONCE_LEN:], purpose.encode())
        except InvalidTag:
            raise SealError(
                "sealed value does not unseal: damaged, moved, or sealed under another "
                "machine key") from None


def load_or_create_machine_key(path: Path) -> bytes:
    """Read the machine key, creating it (0600, atomically, exactly once) when missing."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails if another process won the race; then we use its key.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        key = path.read_bytes()
    if len(key) != 32:
        raise SealError(f"machine key {path} is damaged (expected 32 bytes, found {len(key)})")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SealError(f"machine key {path} is readable by others (mode {mode:o}); "
                        "expected 0600", advice=f"chmod 600 {path}")
    return key
