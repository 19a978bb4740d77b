"""The software key store: what the Microsoft Software Key Storage Provider is on Windows.

Each key is three files in one 0700 directory, all 0600:

- `<key_id>.json`    - metadata: the KeySpec (algorithm, size, exportable, label), format version;
- `<key_id>.pw`      - the key's random password, sealed with `Sealing` (purpose `key:<key_id>`,
                       so a password file copied next to another key does not unseal);
- `<key_id>.key.pem` - the private key as encrypted PKCS#8 PEM (BestAvailableEncryption).

Windows protects software KSP keys with DPAPI; here the password plays the DPAPI master key's
part and the `Sealing` (a machine key, itself TPM-sealed when there is a TPM) plays DPAPI's.
Every file is written atomically (tmp + fsync + rename + directory fsync) and the key file is
written last, so its presence is the commit point: a crash leaves either a whole key or a few
orphan side files that nothing lists.

No lock is held anywhere: key ids are unique per key and each write goes to its own temporary
name, so concurrent creates (RSA generation is CPU-heavy, ~1 s for 4096) never wait on each other.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keystores.base import (
    E_INVALIDARG,
    NTE_BAD_DATA,
    NTE_BAD_KEY_STATE,
    NTE_BAD_KEYSET,
    NTE_INVALID_PARAMETER,
    NTE_NOT_SUPPORTED,
    HashAlg,
    KeyAlgorithm,
    KeyNotFoundError,
    KeySpec,
    KeyStoreError,
    Padding,
    PublicKey,
    Sealing,
    TpmUnavailableError,
    check_spec_shape,
    key_id_for,
)
from keystores.keygen import PrivateKey, generate_ec, generate_rsa

FORMAT_VERSION: Final = 1
KEY_SUFFIX: Final = ".key.pem"
PW_SUFFIX: Final = ".pw"
META_SUFFIX: Final = ".json"
_KEY_ID_RE: Final = re.compile(r"^[0-9a-f]{40}$")

_HASHES: Final[dict[HashAlg, type[hashes.HashAlgorithm]]] = {
    HashAlg.SHA1: hashes.SHA1,
    HashAlg.SHA256: hashes.SHA256,
    HashAlg.SHA384: hashes.SHA384,
    HashAlg.SHA512: hashes.SHA512,
}


def hash_for(alg: HashAlg) -> hashes.HashAlgorithm:
    return _HASHES[alg]()


def validate_key_id(key_id: str) -> None:
    """Key ids are 40 lower-case hex digits (`key_id_for`); anything else never touches a path."""
    if not _KEY_ID_RE.match(key_id):
        raise KeyStoreError(f"{key_id!r} is not a key id (40 lower-case hex digits expected)",
                            hresult=E_INVALIDARG)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` 0600 so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename/unlink durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.name == "posix" and directory.stat().st_mode & 0o077:
        os.chmod(directory, 0o700)


def spec_to_json(spec: KeySpec, key_id: str, **extra: Any) -> bytes:
    meta = {"version": FORMAT_VERSION, "key_id": key_id, "algorithm": spec.algorithm.value,
            "size": spec.size, "exportable": spec.exportable, "label": spec.label, **extra}
    return json.dumps(meta, indent=1, sort_keys=True).encode()


def spec_from_json(data: bytes, key_id: str) -> tuple[KeySpec, dict[str, Any]]:
    try:
        meta = json.loads(data)
        if meta.get("version") != FORMAT_VERSION or meta.get("key_id") != key_id:
            raise ValueError(f"version {meta.get('version')!r}, key id {meta.get('key_id')!r}")
        spec = KeySpec(algorithm=KeyAlgorithm(meta["algorithm"]), size=int(meta["size"]),
                       exportable=bool(meta["exportable"]), label=str(meta.get("label", "")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyStoreError(f"metadata of key {key_id} is damaged: {exc}",
                            hresult=NTE_BAD_KEYSET) from None
    return spec, meta


def generate_private_key(spec: KeySpec) -> PrivateKey:
    """A new private key for `spec`, not stored anywhere yet: `SoftwareKeyStore.create(spec,
    private_key=...)` stores it (see `keystores.keygen`)."""
    check_spec_shape(spec)
    if spec.algorithm is KeyAlgorithm.RSA:
        return generate_rsa(spec.size)
    return generate_ec(spec.size)


def _spec_matches(key: PrivateKey, spec: KeySpec) -> bool:
    if spec.algorithm is KeyAlgorithm.RSA:
        return isinstance(key, rsa.RSAPrivateKey) and key.key_size == spec.size
    return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == spec.size


class SoftwareKeyHandle:
    """A software key, decrypted in memory for the life of the handle."""

    def __init__(self, key_id: str, spec: KeySpec, private_key: PrivateKey) -> None:
        self._key_id = key_id
        self._spec = spec
        self._key = private_key

    def __repr__(self) -> str:
        return f"SoftwareKeyHandle({self._key_id}, {self._spec.algorithm}-{self._spec.size})"

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def spec(self) -> KeySpec:
        return self._spec

    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def sign(self, data: bytes, hash_alg: HashAlg,
             padding: Padding = Padding.PKCS1V15) -> bytes:
        h = hash_for(hash_alg)
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            # Padding does not apply to ECDSA; the signature is DER SEQUENCE {r, s} (RFC 5758).
            return self._key.sign(data, ec.ECDSA(h))
        return self._key.sign(data, rsa_sign_padding(padding, h), h)

    def decrypt(self, ciphertext: bytes, padding: Padding = Padding.PKCS1V15,
                oaep_hash: HashAlg = HashAlg.SHA1) -> bytes:
        if not isinstance(self._key, rsa.RSAPrivateKey):
            raise KeyStoreError("an ECDSA key cannot decrypt (CMS key transport needs RSA)",
                                hresult=NTE_NOT_SUPPORTED)
        try:
            return self._key.decrypt(ciphertext, rsa_decrypt_padding(padding, oaep_hash))
        except ValueError:
            raise KeyStoreError(f"decryption with key {self._key_id} failed ({padding.value}): "
                                "the ciphertext was not made for this key or is damaged",
                                hresult=NTE_BAD_DATA) from None

    def export_pkcs8(self, password: bytes) -> bytes:
        if not self._spec.exportable:
            # NCryptExportKey on a key created without NCRYPT_ALLOW_EXPORT_FLAG.
            raise KeyStoreError(f"key {self._key_id} is not exportable",
                                hresult=NTE_BAD_KEY_STATE,
                                advice="create the key with exportable=True to export it")
        if not password:
            raise KeyStoreError("an export password is required", hresult=NTE_INVALID_PARAMETER)
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(password))


def rsa_sign_padding(pad: Padding, h: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    if pad is Padding.PKCS1V15:
        return padding.PKCS1v15()
    if pad is Padding.PSS:
        # Salt = digest length: what libtpms' TPM2_Sign with RSAPSS uses (the contract tests
        # verify it) and what CNG callers pass, so software and TPM signatures look alike.
        return padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH)
    raise KeyStoreError(f"{pad.value} is not a signature padding", hresult=NTE_INVALID_PARAMETER)


def rsa_decrypt_padding(pad: Padding, oaep_hash: HashAlg) -> padding.AsymmetricPadding:
    if pad is Padding.PKCS1V15:
        return padding.PKCS1v15()
    if pad is Padding.OAEP:
        h = hash_for(oaep_hash)
        # RFC 8017 §7.1 with MGF1 over the same hash and an empty label: the CMS default
        # (RFC 4055 §4.1 RSAES-OAEP-params) and the only form a TPM implements.
        return padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
    raise KeyStoreError(f"{pad.value} is not an encryption padding",
                        hresult=NTE_INVALID_PARAMETER)


class SoftwareKeyStore:
    """Keys as password-encrypted PKCS#8 files, passwords sealed at rest."""

    def __init__(self, directory: Path, sealing: Sealing) -> None:
        self._dir = Path(directory)
        self._sealing = sealing

    @property
    def kind(self) -> str:
        return "software"

    @property
    def directory(self) -> Path:
        return self._dir

    def __repr__(self) -> str:
        return f"SoftwareKeyStore({str(self._dir)!r})"

    def check(self, spec: KeySpec) -> None:
        check_spec_shape(spec)

    def create(self, spec: KeySpec, *, private_key: PrivateKey | None = None) -> SoftwareKeyHandle:
        """Make a key for `spec` and store it; or store `private_key`, made beforehand by
        `generate_private_key(spec)` (it must match the spec)."""
        self.check(spec)
        if private_key is None:
            key = generate_private_key(spec)  # CPU-heavy, outside any lock (there is none)
        elif _spec_matches(private_key, spec):
            key = private_key
        else:
            raise KeyStoreError(f"the key given does not match {spec.algorithm.value}-{spec.size}",
                                hresult=NTE_INVALID_PARAMETER)
        key_id = key_id_for(key.public_key())
        # 32 random bytes as URL-safe text, as secrets.token_urlsafe(32) makes them (secrets
        # imports hmac, which loads a second libcrypto: ~3 ms of every start)
        password = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(password))
        sealed = self._sealing.seal(password, purpose=f"key:{key_id}")
        ensure_private_dir(self._dir)
        # Side files first, the key last: the key file's rename is the commit point.
        write_atomic(self._path(key_id, META_SUFFIX), spec_to_json(spec, key_id))
        write_atomic(self._path(key_id, PW_SUFFIX), sealed)
        write_atomic(self._path(key_id, KEY_SUFFIX), pem)
        return SoftwareKeyHandle(key_id, spec, key)

    def load(self, key_id: str) -> SoftwareKeyHandle:
        validate_key_id(key_id)
        try:
            pem = self._path(key_id, KEY_SUFFIX).read_bytes()
            sealed = self._path(key_id, PW_SUFFIX).read_bytes()
            meta = self._path(key_id, META_SUFFIX).read_bytes()
        except FileNotFoundError:
            raise KeyNotFoundError(key_id) from None
        spec, _ = spec_from_json(meta, key_id)
        try:
            password = self._sealing.unseal(sealed, purpose=f"key:{key_id}")
        except TpmUnavailableError:
            raise  # a TPM-backed sealer whose TPM is down: say that, not "wrong key"
        except Exception as exc:  # the Sealing implementation's own error type
            raise KeyStoreError(
                f"the password of key {key_id} does not unseal: {exc}", hresult=NTE_BAD_KEYSET,
                advice="the key store was sealed under another machine key (was machine.key "
                       "replaced or the state copied from another device?); enroll again to "
                       "create a new key") from None
        try:
            key = serialization.load_pem_private_key(pem, password)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"key file of {key_id} does not decrypt or is damaged: {exc}",
                                hresult=NTE_BAD_KEYSET) from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise KeyStoreError(f"key {key_id} is a {type(key).__name__}, not RSA or ECDSA",
                                hresult=NTE_BAD_KEYSET)
        if key_id_for(key.public_key()) != key_id:
            raise KeyStoreError(f"key file {key_id}{KEY_SUFFIX} holds another key",
                                hresult=NTE_BAD_KEYSET)
        return SoftwareKeyHandle(key_id, spec, key)

    def delete(self, key_id: str) -> None:
        validate_key_id(key_id)
        # The key file first: once it is gone the key is gone, whatever happens next.
        for suffix in (KEY_SUFFIX, PW_SUFFIX, META_SUFFIX):
            self._path(key_id, suffix).unlink(missing_ok=True)
        if self._dir.is_dir():
            fsync_dir(self._dir)

    def list_ids(self) -> list[str]:
        if not self._dir.is_dir():
            return []
        ids = (p.name[: -len(KEY_SUFFIX)] for p in self._dir.iterdir()
               if p.name.endswith(KEY_SUFFIX))
        return sorted(i for i in ids if _KEY_ID_RE.match(i))

    def _path(self, key_id: str, suffix: str) -> Path:
        return self._dir / f"{key_id}{suffix}"

