"""The TPM key store: what the Microsoft Platform Crypto Provider is on Windows (tpm2-pytss ESAPI).

Keys are made by TPM2_Create under the owner hierarchy's storage primary key and never leave
the TPM in clear: what is kept on disk is the TPM-wrapped blob (TPM2B_PUBLIC + TPM2B_PRIVATE)
in the TSS2 PRIVATE KEY PEM format ("ASN.1 Specification for TPM 2.0 Key Files"), which
tpm2-openssl, tpm2-tss-engine and `tpm2_pytss.tsskey.TSSPrivKey` read, plus a metadata JSON:

- `<key_id>.json`      - KeySpec and format version (written first);
- `<key_id>.tss2.pem`  - the blob, parent = TPM2_RH_OWNER (written last: the commit point).

Parent = TPM2_RH_OWNER means, in that format, "the primary made from the standard SRK template"
(TCG TPM v2.0 Provisioning Guidance §7.5.1: ECC NIST P-256 when the TPM has ECC, else RSA-2048;
restricted decrypt, AES-128-CFB, empty unique). The primary is derived from the owner seed, so
it is re-created on demand (a few ms for ECC) and never needs a persistent handle.

Key objects: RSA keys are sign|decrypt (SCEP needs both: the CSR and the pkiMessage are signed
and the CertRep envelope's CEK is key-transported to this key), ECDSA keys sign only; both
fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA, empty auth, not restricted (a
restricted key cannot both sign and decrypt, TPM 2.0 Part 1 §25.2), scheme TPM2_ALG_NULL so
each call picks RSASSA/RSAPSS/RSAES/OAEP.

Connections: one ESAPI context per operation, under a per-store lock. A TPM has few object
slots (3 on swtpm) and the swtpm socket serves one connection at a time, so every transient
object is flushed in `finally` and nothing is kept open between calls; a restarted swtpm or
resource manager is simply picked up by the next call, and a TPM that is gone is a
`TpmUnavailableError` naming the TCTI. The calls block: async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

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

# libtss2 logs every transport failure to stderr (WARNING:tcti:..., ERROR:esys:...) before the
# caller sees an error; ours already carry the decoded response code and advice, so the TSS log
# is off unless the user asks for it (TSS2_LOG=all+ERROR). Read by libtss2 on first use.
os.environ.setdefault("TSS2_LOG", "all+NONE")

try:  # tpm2-pytss is an optional extra ("dmagent[tpm]") and needs libtss2 at run time.
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2_ALG,
        TPM2_CAP,
        TPM2_ECC,
        TPM2_HT,
        TPM2_PT,
        TPM2_RH,
        TPM2_ST,
        TPM2B_DATA,
        TPM2B_DIGEST,
        TPM2B_PUBLIC,
        TPM2B_PUBLIC_KEY_RSA,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPML_PCR_SELECTION,
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
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
        TCTILdr,
        TSS2_Exception,
    )
    from tpm2_pytss.tsskey import TSSPrivKey

    _IMPORT_ERROR: Exception | None = None
except (ImportError, OSError) as exc:  # OSError: libtss2-*.so missing
    _IMPORT_ERROR = exc

    class TSS2_Exception(Exception):  # type: ignore[no-redef]
        """Stand-in so `except TSS2_Exception` stays valid without tpm2-pytss."""

__all__ = ["TSS2_Exception", "TpmConnection", "TpmInfo", "TpmKeyHandle", "TpmKeyStore",
           "probe_tpm", "require_tss"]

PEM_SUFFIX: Final = ".tss2.pem"
META_SUFFIX: Final = ".json"
# HRESULT facility for TPM 2.0 response codes as Windows TBS reports them (TPM_20_E_*).
TPM_E_BASE: Final = 0x80280000
_TPM_RC_FAILURE: Final = 0x101
TCTI_ADVICE: Final = ("check the [tpm] tcti setting (e.g. swtpm:host=127.0.0.1,port=2321 or "
                      "device:/dev/tpmrm0), that the TPM or swtpm is running and that this "
                      "user may open it; use KeyProtection 3 for a software key")

T = TypeVar("T")


def open_advice(tcti: str) -> str:
    name = tcti.split(":", 1)[0]
    if name in ("swtpm", "mssim"):
        # Both TCTIs also need the control/platform channel, always on the data port + 1.
        return (f"is {name} running and listening on the port in {tcti!r} *and* on that port "
                "+ 1 (its control channel, e.g. swtpm --ctrl type=tcp,port=N+1)? "
                + TCTI_ADVICE)
    return TCTI_ADVICE


def require_tss() -> None:
    if _IMPORT_ERROR is not None:
        raise TpmUnavailableError(
            f"the TPM key store needs tpm2-pytss and libtss2, which do not load here: "
            f"{_IMPORT_ERROR}",
            advice="pip install 'dmagent[tpm]' (builds against libtss2-dev: apt install "
                   "libtss2-dev), or use KeyProtection 3 for a software key")


def _srk_template(ecc: bool) -> Any:
    """TCG Provisioning Guidance §7.5.1 SRK template, as the TSS2 key-file format expects."""
    attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
             | TPMA_OBJECT.NODA | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                              mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
    if ecc:
        params = TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=sym, scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256, kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL)))
        return TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
                           authPolicy=b"", parameters=params)
    params = TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
        symmetric=sym, scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL), keyBits=2048, exponent=0))
    return TPMT_PUBLIC(type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
                       authPolicy=b"", parameters=params)


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


def _is_tcti_error(exc: BaseException) -> bool:
    """TCTI layer (0x000A0000): the transport to the TPM failed, not the TPM itself."""
    rc = getattr(exc, "rc", 0)
    return isinstance(exc, TSS2_Exception) and (int(rc) & 0xFF0000) == 0x0A0000


def tpm_hresult(exc: BaseException) -> int:
    """A TPM response code as the HRESULT Windows reports (0x8028xxxx, TPM_20_E_*)."""
    rc = int(getattr(exc, "rc", 0))
    return TPM_E_BASE | (rc & 0xFFFF) if (rc & 0xFF0000) == 0 else NTE_BAD_DATA


@dataclass(frozen=True)
class TpmInfo:
    """What a probe learnt about the TPM (for `status` and the KeyProtection decision)."""

    tcti: str
    manufacturer: str
    ecc_srk: bool


class TpmConnection:
    """Per-operation ESAPI contexts to one TCTI, serialised by a lock, errors made precise."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._lock = threading.Lock()
        self._ecc_srk: bool | None = None  # which SRK template this TPM takes (cached)

    @contextmanager
    def session(self, what: str) -> Iterator[Any]:
        """An open ESAPI context; TSS2 errors inside become KeyStoreErrors naming `what`."""
        require_tss()
        with self._lock:
            try:
                tcti = TCTILdr.parse(self.tcti)
            except (TSS2_Exception, RuntimeError, ValueError) as exc:
                raise TpmUnavailableError(f"cannot open the TPM at {self.tcti!r}: {exc}",
                                          advice=open_advice(self.tcti)) from None
            try:
                ectx = ESAPI(tcti)
                try:
                    yield ectx
                finally:
                    ectx.close()
            except TSS2_Exception as exc:
                raise self.error(exc, what) from None
            finally:
                tcti.close()

    def error(self, exc: BaseException, what: str) -> KeyStoreError:
        if _is_tcti_error(exc):
            return TpmUnavailableError(
                f"the TPM at {self.tcti!r} stopped answering during {what}: {exc}",
                advice=open_advice(self.tcti))
        return KeyStoreError(f"{what} failed in the TPM: {exc} (rc 0x{int(exc.rc):03x})",  # type: ignore[attr-defined]
                             hresult=tpm_hresult(exc))

    def primary(self, ectx: Any) -> Any:
        """Create the SRK (transient). The caller flushes it."""
        if self._ecc_srk is None:
            self._ecc_srk = _has_alg(ectx, TPM2_ALG.ECC)
        handle, _, _, _, _ = ectx.create_primary(
            in_sensitive=TPM2B_SENSITIVE_CREATE(),
            in_public=TPM2B_PUBLIC(publicArea=_srk_template(self._ecc_srk)),
            primary_handle=ESYS_TR.RH_OWNER, outside_info=TPM2B_DATA(),
            creation_pcr=TPML_PCR_SELECTION())
        return handle

    def with_loaded(self, ectx: Any, public: Any, private: Any, fn: Callable[[Any], T]) -> T:
        """Load a child of the SRK, run `fn(handle)`, and flush everything whatever happens."""
        parent = self.primary(ectx)
        try:
            handle = ectx.load(parent_handle=parent, in_private=private, in_public=public)
        finally:
            flush(ectx, parent)
        try:
            result = fn(handle)
        except BaseException:
            with suppress(TSS2_Exception):  # the connection may be what failed
                ectx.flush_context(handle)
            raise
        ectx.flush_context(handle)
        return result

    def create(self, ectx: Any, template: Any, sensitive: Any) -> tuple[Any, Any]:
        """TPM2_Create under the SRK; returns (TPM2B_PUBLIC, TPM2B_PRIVATE)."""
        parent = self.primary(ectx)
        try:
            private, public, _, _, _ = ectx.create(
                parent_handle=parent, in_sensitive=sensitive,
                in_public=TPM2B_PUBLIC(publicArea=template), outside_info=TPM2B_DATA(),
                creation_pcr=TPML_PCR_SELECTION())
        finally:
            flush(ectx, parent)
        return public, private

    def probe(self) -> TpmInfo:
        with self.session("TPM2_GetCapability") as ectx:
            _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MANUFACTURER, 1)
            value = int(data.data.tpmProperties.tpmProperty[0].value)
            ecc = _has_alg(ectx, TPM2_ALG.ECC)
        manufacturer = value.to_bytes(4, "big").rstrip(b"\0 ").decode("ascii", "replace")
        return TpmInfo(self.tcti, manufacturer, ecc)

    def transient_handles(self) -> int:
        """How many transient objects the TPM holds now (0 when nobody leaks)."""
        with self.session("TPM2_GetCapability") as ectx:
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
            return int(data.data.handles.count)


def flush(ectx: Any, handle: Any) -> None:
    ectx.flush_context(handle)


def _has_alg(ectx: Any, alg: Any) -> bool:
    _, data = ectx.get_capability(TPM2_CAP.ALGS, int(alg), 1)
    algs = data.data.algorithms
    return bool(algs.count) and int(algs.algProperties[0].alg) == int(alg)


def probe_tpm(tcti: str, timeout: float = 2.0) -> TpmInfo:
    """Is a TPM answering at `tcti`? Raises TpmUnavailableError, never waits beyond `timeout`.

    libtss2 has no connect/receive timeout that the swtpm and mssim TCTIs honour (a peer that
    accepts but never answers blocks Tss2_Tcti_Swtpm_Init forever), so the probe runs in a
    daemon thread that is abandoned when it overruns.
    """
    if not tcti:
        raise TpmUnavailableError("no TPM is configured (the [tpm] tcti setting is empty)",
                                  advice=TCTI_ADVICE)
    require_tss()
    result: list[TpmInfo | BaseException] = []

    def run() -> None:
        try:
            result.append(TpmConnection(tcti).probe())
        except BaseException as exc:
            result.append(exc)

    worker = threading.Thread(target=run, name=f"tpm-probe {tcti}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise TpmUnavailableError(f"the TPM at {tcti!r} did not answer within {timeout:g} s",
                                  advice=TCTI_ADVICE)
    outcome = result[0]
    if isinstance(outcome, KeyStoreError):
        raise TpmUnavailableError(outcome.message, advice=outcome.advice or TCTI_ADVICE)
    if isinstance(outcome, BaseException):
        raise TpmUnavailableError(f"the TPM at {tcti!r} does not answer: {outcome}",
                                  advice=TCTI_ADVICE)
    return outcome


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
        # (TPM 2.0 Part 3 §20.2: a NULL ticket is accepted when the key is not restricted).
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
            # libtpms uses salt length = digest length (TPM 2.0 Part 1 §B.7), as our software
            # store does.
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
            # OAEP with MGF1 over the same hash and an empty label (TPM 2.0 Part 1 §B.10.3).
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
            if _is_tcti_error(exc):
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
