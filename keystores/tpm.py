"""The TPM key store: what the Microsoft Platform Crypto Provider is on Windows (tpm2-pytss ESAPI).

Keys are made by TPM2_Create under the owner hierarchy's storage primary key and never leave
the TPM in clear: what is kept on disk is the TPM-wrapped blob (TPM2B_PUBLIC + TPM2B_PRIVATE)
in the TSS2 PRIVATE KEY PEM format ("ASN.1 Specification for TPM 2.0 Key Files"), which
tpm2-openssl, tpm2-tss-engine and `tpm2_pytss.tsskey.TSSPrivKey` read, plus a metadata JSON:

- `<key_id>.json`      - KeySpec and format version (written first);
- `<key_id>.tss2.pem`  - the blob, parent = TPM2_RH_OWNER (written last: the commit point).

Parent = TPM2_RH_OWNER means, in that format, "the primary made from the standard SRK template"
(see `keystores.tpm_session`, which also holds the per-operation ESAPI sessions, the error
mapping and the presence probe).

Key objects: RSA keys are sign|decrypt (SCEP needs both: the CSR and the pkiMessage are signed
and the CertRep envelope's CEK is key-transported to this key), ECDSA keys sign only; both
fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA, empty auth, not restricted (a
restricted key cannot both sign and decrypt: TPM 2.0 Part 2, TPMA_OBJECT), scheme TPM2_ALG_NULL so
each call picks RSASSA/RSAPSS/RSAES/OAEP. Every transient object is flushed in `finally`.
"""

from __future__ import annotations

import hashlib
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keystores.base import (
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
    TpmUnavailableError,
    UnsupportedKeyError,
    check_spec_shape,
    key_id_for,
)
from keystores.software import (
    ensure_private_dir,
    fsync_dir,
    spec_from_json,
    spec_to_json,
    validate_key_id,
    write_atomic,
)
from keystores.tpm_session import (
    TpmConnection,
    TpmInfo,
    is_tcti_error,
    probe_tpm,
    require_tss,
)

try:  # tpm2-pytss is an optional extra ("dmagent[tpm]") and needs libtss2 at run time.
    from tpm2_pytss import (
        TPM2_ALG,
        TPM2_ECC,
        TPM2_RH,
        TPM2_ST,
        TPM2B_DATA,
        TPM2B_DIGEST,
        TPM2B_PUBLIC_KEY_RSA,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPMS_ECC_PARMS,
        TPMS_RSA_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_PUBLIC_PARMS,
        TPMT_RSA_DECRYPT,
        TPMT_RSA_SCHEME,
        TPMT_SIG_SCHEME,
        TPMT_SYM_DEF_OBJECT,
        TPMT_TK_HASHCHECK,
        TPMU_PUBLIC_PARMS,
        TSS2_Exception,
    )
    from tpm2_pytss.tsskey import TSSPrivKey
except (ImportError, OSError):  # reported by require_tss() when a store is made
    from keystores.tpm_session import TSS2_Exception

__all__ = ["TSS2_Exception", "TpmConnection", "TpmInfo", "TpmKeyHandle", "TpmKeyStore",
           "probe_tpm", "require_tss"]

PEM_SUFFIX: Final = ".tss2.pem"
META_SUFFIX: Final = ".json"


def _key_parms(spec: KeySpec) -> Any:
    """TPMT_PUBLIC_PARMS for TPM2_TestParms and the key template (unrestricted: NULL schemes)."""
    if spec.algorithm is KeyAlgorithm.RSA:
        return TPMT_PUBLIC_PARMS(type=TPM2_ALG.RSA, parameters=TPMU_PUBLIC_PARMS(
            rsaDetail=TPMS_RSA_PARMS(symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                                     scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                                     keyBits=spec.size, exponent=0)))
    curve = TPM2_ECC.NIST_P256 if spec.size == 256 else TPM2_ECC.NIST_P384
    return TPMT_PUBLIC_PARMS(type=TPM2_ALG.ECC, parameters=TPMU_PUBLIC_PARMS(
        eccDetail=TPMS_ECC_PARMS(symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                                 scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL), curveID=curve,
                                 kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))))


def _key_template(spec: KeySpec) -> Any:
    attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.NODA
             | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    if spec.algorithm is KeyAlgorithm.RSA:
        attrs |= TPMA_OBJECT.DECRYPT  # CertRep key transport (RFC 8894 §3.3.2, CMS EnvelopedData)
    parms = _key_parms(spec)
    return TPMT_PUBLIC(type=parms.type, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
                       authPolicy=b"", parameters=parms.parameters)


def _tpm_hash(alg: HashAlg) -> Any:
    return {HashAlg.SHA1: TPM2_ALG.SHA1, HashAlg.SHA256: TPM2_ALG.SHA256,
            HashAlg.SHA384: TPM2_ALG.SHA384, HashAlg.SHA512: TPM2_ALG.SHA512}[alg]


def _public_key(blob_public: Any) -> PublicKey:
    key = serialization.load_pem_public_key(blob_public.publicArea.to_pem())
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):  # pragma: no cover
        raise KeyStoreError(f"unexpected public key type {type(key).__name__}",
                            hresult=NTE_BAD_KEYSET)
    return key


class TpmKeyHandle:
    """A TPM-resident key: each operation loads the blob, uses it and flushes it."""

    def __init__(self, conn: TpmConnection, key_id: str, spec: KeySpec, blob: Any) -> None:
        self._conn = conn
        self._key_id = key_id
        self._spec = spec
        self._blob = blob
        self._public = _public_key(blob.public)

    def __repr__(self) -> str:
        return f"TpmKeyHandle({self._key_id}, {self._spec.algorithm}-{self._spec.size})"

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def spec(self) -> KeySpec:
        return self._spec

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes, hash_alg: HashAlg,
             padding: Padding = Padding.PKCS1V15) -> bytes:
        # Hash here, sign the digest in the TPM: an unrestricted key needs no hash ticket
        # (TPM 2.0 Part 3, TPM2_Sign: a NULL ticket is accepted when the key is not restricted).
        digest = hashlib.new(hash_alg.value, data).digest()
        scheme = TPMT_SIG_SCHEME(scheme=self._sig_scheme(padding))
        if scheme.scheme == TPM2_ALG.ECDSA:
            scheme.details.ecdsa.hashAlg = _tpm_hash(hash_alg)
        elif scheme.scheme == TPM2_ALG.RSAPSS:
            scheme.details.rsapss.hashAlg = _tpm_hash(hash_alg)
        else:
            scheme.details.rsassa.hashAlg = _tpm_hash(hash_alg)
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._conn.session("TPM2_Sign") as ectx:
            sig = self._conn.with_loaded(
                ectx, self._blob.public, self._blob.private,
                lambda h: ectx.sign(key_handle=h, digest=TPM2B_DIGEST(digest),
                                    in_scheme=scheme, validation=ticket))
        if scheme.scheme == TPM2_ALG.ECDSA:
            # TPMS_SIGNATURE_ECDSA carries r and s; X.509/CMS want DER SEQUENCE {r, s}.
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            return encode_dss_signature(r, s)
        if scheme.scheme == TPM2_ALG.RSAPSS:
            return bytes(sig.signature.rsapss.sig)
        return bytes(sig.signature.rsassa.sig)

    def _sig_scheme(self, padding: Padding) -> Any:
        if self._spec.algorithm is KeyAlgorithm.EC:
            return TPM2_ALG.ECDSA
        if padding is Padding.PKCS1V15:
            return TPM2_ALG.RSASSA
        if padding is Padding.PSS:
            # libtpms uses salt length = digest length (the contract tests verify it), as
            # the software store does.
            return TPM2_ALG.RSAPSS
        raise KeyStoreError(f"{padding.value} is not a signature padding",
                            hresult=NTE_INVALID_PARAMETER)

    def decrypt(self, ciphertext: bytes, padding: Padding = Padding.PKCS1V15,
                oaep_hash: HashAlg = HashAlg.SHA1) -> bytes:
        if self._spec.algorithm is not KeyAlgorithm.RSA:
            raise KeyStoreError("an ECDSA key cannot decrypt (CMS key transport needs RSA)",
                                hresult=NTE_NOT_SUPPORTED)
        if padding is Padding.PKCS1V15:
            scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.RSAES)
        elif padding is Padding.OAEP:
            # OAEP with MGF1 over the same hash and an empty label (TPM 2.0 Part 1, Annex B).
            scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.OAEP)
            scheme.details.oaep.hashAlg = _tpm_hash(oaep_hash)
        else:
            raise KeyStoreError(f"{padding.value} is not an encryption padding",
                                hresult=NTE_INVALID_PARAMETER)
        size = self._spec.size // 8
        if len(ciphertext) > size:
            raise KeyStoreError(f"ciphertext of {len(ciphertext)} bytes is longer than the "
                                f"{size}-byte modulus", hresult=NTE_BAD_DATA)
        # An encoder that dropped leading zero octets: I2OSP to the modulus length (RFC 8017).
        ciphertext = ciphertext.rjust(size, b"\0")
        try:
            with self._conn.session("TPM2_RSA_Decrypt") as ectx:
                out = self._conn.with_loaded(
                    ectx, self._blob.public, self._blob.private,
                    lambda h: ectx.rsa_decrypt(key_handle=h,
                                               cipher_text=TPM2B_PUBLIC_KEY_RSA(ciphertext),
                                               in_scheme=scheme, label=TPM2B_DATA()))
        except TpmUnavailableError:
            raise
        except KeyStoreError as exc:
            # A padding check failure is TPM_RC_VALUE on the reference TPM and TPM_RC_FAILURE
            # on libtpms (its OpenSSL back end); the TPM stays operational either way.
            raise KeyStoreError(f"decryption with key {self._key_id} failed "
                                f"({padding.value}): the ciphertext was not made for this key "
                                f"or is damaged ({exc.message})", hresult=NTE_BAD_DATA) from None
        return bytes(out)

    def export_pkcs8(self, password: bytes) -> bytes:
        raise KeyStoreError(f"key {self._key_id} lives in the TPM and cannot be exported",
                            hresult=NTE_BAD_KEY_STATE,
                            advice="use KeyProtection 3 (software KSP) for exportable keys")


class TpmKeyStore:
    """Keys in a TPM reached through a TCTI; blobs and metadata in `directory`."""

    def __init__(self, tcti: str, directory: Path) -> None:
        require_tss()
        self._conn = TpmConnection(tcti)
        self._dir = Path(directory)

    @property
    def kind(self) -> str:
        return "tpm"

    @property
    def tcti(self) -> str:
        return self._conn.tcti

    @property
    def directory(self) -> Path:
        return self._dir

    def __repr__(self) -> str:
        return f"TpmKeyStore({self._conn.tcti!r}, {str(self._dir)!r})"

    def probe(self, timeout: float = 2.0) -> TpmInfo:
        return probe_tpm(self._conn.tcti, timeout)

    def transient_handles(self) -> int:
        return self._conn.transient_handles()

    def check(self, spec: KeySpec) -> None:
        self._check_shape(spec)
        with self._conn.session("TPM2_TestParms") as ectx:
            self._test_parms(ectx, spec)

    def _check_shape(self, spec: KeySpec) -> None:
        check_spec_shape(spec)
        if spec.exportable:
            # NCRYPT_ALLOW_EXPORT_FLAG on the Platform Crypto Provider: fixedTPM keys never leave.
            raise UnsupportedKeyError("TPM keys cannot be exportable (they are fixedTPM)",
                                      advice="use KeyProtection 3 (software KSP) for an "
                                             "exportable key")

    def _test_parms(self, ectx: Any, spec: KeySpec) -> None:
        try:
            ectx.test_parms(_key_parms(spec))
        except TSS2_Exception as exc:
            if is_tcti_error(exc):
                raise
            name = f"RSA-{spec.size}" if spec.algorithm is KeyAlgorithm.RSA else \
                f"ECDSA P-{spec.size}"
            raise UnsupportedKeyError(
                f"this TPM does not support {name} keys (TPM2_TestParms: {exc})",
                advice="use KeyLength 2048 (RSA) or P-256 in the TPM, or KeyProtection 3 "
                       "(software KSP) for this key size") from None

    def create(self, spec: KeySpec) -> TpmKeyHandle:
        self._check_shape(spec)
        with self._conn.session("TPM2_Create") as ectx:
            self._test_parms(ectx, spec)
            public, private = self._conn.create(ectx, _key_template(spec),
                                                TPM2B_SENSITIVE_CREATE())
        blob = TSSPrivKey(private, public, empty_auth=True, parent=int(TPM2_RH.OWNER))
        key_id = key_id_for(_public_key(public))
        ensure_private_dir(self._dir)
        write_atomic(self._path(key_id, META_SUFFIX),
                     spec_to_json(spec, key_id, parent="owner-srk"))
        write_atomic(self._path(key_id, PEM_SUFFIX), bytes(blob.to_pem()))
        return TpmKeyHandle(self._conn, key_id, spec, blob)

    def load(self, key_id: str) -> TpmKeyHandle:
        validate_key_id(key_id)
        try:
            pem = self._path(key_id, PEM_SUFFIX).read_bytes()
            meta = self._path(key_id, META_SUFFIX).read_bytes()
        except FileNotFoundError:
            raise KeyNotFoundError(key_id) from None
        spec, _ = spec_from_json(meta, key_id)
        try:
            blob = TSSPrivKey.from_pem(pem)
        except (ValueError, TypeError, TSS2_Exception) as exc:
            raise KeyStoreError(f"TPM key blob {key_id}{PEM_SUFFIX} is damaged: {exc}",
                                hresult=NTE_BAD_KEYSET) from None
        if key_id_for(_public_key(blob.public)) != key_id:
            raise KeyStoreError(f"TPM key blob {key_id}{PEM_SUFFIX} holds another key",
                                hresult=NTE_BAD_KEYSET)
        # Fail here, not in the middle of an enrollment, when the blob is not this TPM's
        # (TPM cleared, state copied from another device): TPM2_Load checks its integrity.
        try:
            with self._conn.session("TPM2_Load") as ectx:
                self._conn.with_loaded(ectx, blob.public, blob.private, lambda h: None)
        except TpmUnavailableError:
            raise
        except KeyStoreError as exc:
            raise KeyStoreError(
                f"key {key_id} does not load in the TPM at {self._conn.tcti!r}: {exc.message}",
                hresult=exc.hresult,
                advice="the TPM was cleared or the key belongs to another TPM; enroll again "
                       "to create a new key") from None
        return TpmKeyHandle(self._conn, key_id, spec, blob)

    def delete(self, key_id: str) -> None:
        validate_key_id(key_id)
        # The blob is the key (the TPM holds nothing persistent for it): remove it first.
        for suffix in (PEM_SUFFIX, META_SUFFIX):
            self._path(key_id, suffix).unlink(missing_ok=True)
        if self._dir.is_dir():
            fsync_dir(self._dir)

    def list_ids(self) -> list[str]:
        if not self._dir.is_dir():
            return []
        ids = (p.name[: -len(PEM_SUFFIX)] for p in self._dir.iterdir()
               if p.name.endswith(PEM_SUFFIX))
        out = []
        for i in ids:
            with suppress(KeyStoreError):
                validate_key_id(i)
                out.append(i)
        return sorted(out)

    def _path(self, key_id: str, suffix: str) -> Path:
        return self._dir / f"{key_id}{suffix}"


def __getattr__(name: str) -> Any:
    """`from keystores.tpm import TpmSealer` works; it lives in tpm_sealing (built on this)."""
    if name == "TpmSealer":
        from keystores.tpm_sealing import TpmSealer

        return TpmSealer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
