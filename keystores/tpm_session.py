"""TPM sessions for the key store and the sealer: one ESAPI context per operation.

Why per operation: a TPM has few object slots (3 on swtpm) and the swtpm socket serves one
connection at a time, so nothing is kept open between calls; a restarted swtpm or resource
manager is picked up by the next call, and a TPM that is gone is a `TpmUnavailableError`
naming the TCTI. Calls are serialised per connection object by a lock (several threads from
`asyncio.to_thread` share a store) and block: async callers use `asyncio.to_thread`.

The storage primary key (SRK) is re-created on demand from the owner seed with the TCG
Provisioning Guidance SRK template: ECC NIST P-256 when the TPM has ECC, else RSA-2048,
restricted decrypt, AES-128-CFB, empty unique. That is what parent = TPM2_RH_OWNER means in the
TSS2 key-file format, so blobs made here load in tpm2-openssl and `tpm2_pytss.tsskey`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from keystores.base import NTE_BAD_DATA, KeyStoreError, TpmUnavailableError

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
        TPM2B_DATA,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPML_PCR_SELECTION,
        TPMS_ECC_PARMS,
        TPMS_RSA_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_RSA_SCHEME,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
        TCTILdr,
        TSS2_Exception,
    )

    _IMPORT_ERROR: Exception | None = None
except (ImportError, OSError) as exc:  # OSError: libtss2-*.so missing
    _IMPORT_ERROR = exc

    class TSS2_Exception(Exception):  # type: ignore[no-redef]
        """Stand-in so `except TSS2_Exception` stays valid without tpm2-pytss."""

# HRESULT facility for TPM 2.0 response codes as Windows TBS reports them (TPM_20_E_*).
TPM_E_BASE: Final = 0x80280000
TCTI_ADVICE: Final = ("check the [tpm] tcti setting (e.g. swtpm:host=127.0.0.1,port=2321 or "
                      "device:/dev/tpmrm0), that the TPM or swtpm is running and that this "
                      "user may open it; use KeyProtection 3 for a software key")

__all__ = ["TSS2_Exception", "TpmConnection", "TpmInfo", "is_tcti_error", "open_advice",
           "probe_tpm", "require_tss", "tpm_hresult"]

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
    """TCG Provisioning Guidance SRK template, as the TSS2 key-file format expects."""
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

def is_tcti_error(exc: BaseException) -> bool:
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


# One lock per TPM (TCTI string) for the whole process: key stores are cheap objects made per
# use, but the TPM behind them is one shared device whose few object slots and single swtpm
# connection must be used by one operation at a time. Process-wide by nature, hence global.
_TPM_LOCKS: dict[str, threading.Lock] = {}
_TPM_LOCKS_GUARD = threading.Lock()


def _tpm_lock(tcti: str) -> threading.Lock:
    with _TPM_LOCKS_GUARD:
        return _TPM_LOCKS.setdefault(tcti, threading.Lock())


class TpmConnection:
    """Per-operation ESAPI contexts to one TCTI, serialised by a lock, errors made precise."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._lock = _tpm_lock(tcti)
        self._ecc_srk: bool | None = None  # which SRK template this TPM takes (cached)

    @contextmanager
    def session(self, what: str, *, sweep: bool = True) -> Iterator[Any]:
        """An open ESAPI context; TSS2 errors inside become KeyStoreErrors naming `what`.
        `sweep` first flushes transient objects leaked by a dead process."""
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
                    if sweep:
                        flush_leaked_transients(ectx)
                    yield ectx
                finally:
                    ectx.close()
            except TSS2_Exception as exc:
                raise self.error(exc, what) from None
            finally:
                tcti.close()

    def error(self, exc: BaseException, what: str) -> KeyStoreError:
        if is_tcti_error(exc):
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
        with self.session("TPM2_GetCapability", sweep=False) as ectx:
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
            return int(data.data.handles.count)


def flush(ectx: Any, handle: Any) -> None:
    ectx.flush_context(handle)


def flush_leaked_transients(ectx: Any) -> int:
    """Flush transient objects left by a process that died mid-operation (e.g. SIGKILL).

    Every operation here flushes what it loads, so at the start of a session any transient
    object in the TPM is a leak: without a resource manager (swtpm over a socket) nobody else
    flushes it, and three leaks exhaust swtpm's object slots (TPM_RC_OBJECT_MEMORY, 0x902) for
    good. With a resource manager (/dev/tpmrm0, tabrmd) handles are per connection and a new
    session sees none, so this is a no-op there. Returns how many were flushed.
    """
    _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
    listed = data.data.handles
    handles = [int(listed.handle[i]) for i in range(int(listed.count))]
    for tpm_handle in handles:
        with suppress(TSS2_Exception):
            ectx.flush_context(ectx.tr_from_tpmpublic(tpm_handle))
    return len(handles)


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


