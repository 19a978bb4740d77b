"""The dmcertinst job: one enrollment attempt for one ClientCertificateInstall SCEP node.

`dmcertinst.exe -s -k "<Install key>" -h HKLM|HKCU -t <UniqueID>` on Windows; here
`dmagent certinst` with the same arguments, run by the enrollment task (three attempts, one
minute apart) or by hand. One attempt:

1. count the attempt on the task and set Status 32 / ErrorCode 0 (one commit);
2. read the Install key and unseal the Challenge;
3. make the key where KeyProtection says (or reuse the key a killed or PENDING attempt already
   made: its id is recorded *before* any request leaves the device);
4. SCEP: GetCACaps → GetCACert (CAThumbprint) → PKCSReq → CertRep (PENDING polled per
   RetryDelay × RetryCount);
5. success: one commit installs the certificate in My (chain in CA), replaces any earlier
   certificate of this node, writes CertThumbprint / Status 1 / ErrorCode 0 /
   RespondentServerUrl, deletes the Challenge and the task; failure: Status 16 (2 while PENDING)
   and the HRESULT; after the last attempt the Challenge and the task go too.

Crash safety: every state change is a registry transaction, so a killed attempt leaves either
the old state or the new one. A key created but not yet recorded (killed in between) carries
the UniqueID as its label and is removed by the next attempt; so are the keys of replaced
certificates. Two attempts for one node never run at once (a per-node file lock).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.certstore import CertStore, Scope, StoreName
from agent.device import DeviceContext
from agent.diagnostics import (
    HResult,
    ScepStatus,
    ev_cert_installed,
    ev_enroll_failed,
    ev_install_from_reg,
    ev_log_error,
    ev_request_generated,
    format_hex,
)
from agent.errors import DmAgentError, NotFoundError, PeerError, StateLockedError
from agent.taskstore import SYSTEM_SID, TaskRecord, TaskStore, task_name
from keystores.base import KeyHandle, KeySpec, KeyStore, KeyStoreError

if TYPE_CHECKING:
    from agent.scep.enroll import EnrollResult

log = logging.getLogger("dmagent.certinst")

Hive = Literal["HKLM", "HKCU"]
Sleep = Callable[[float], Awaitable[Any]]

PENDING_KEY_ID = "PendingKeyId"
PENDING_KEY_STORE = "PendingKeyStore"
# Store Location in event 36: 1 = local machine (device), 2 = current user (seed 001 shows 0x1).
_STORE_LOCATION = {Scope.DEVICE: 1, Scope.USER: 2}


@dataclass(frozen=True)
class CertinstRequest:
    """The command line of the task: `-k <Install key> -h <hive> -t <UniqueID>`."""

    install_key: str  # without the hive, e.g. Software\Microsoft\SCEP\MS DM Server\<id>\Install
    hive: Hive
    unique_id: str

    @property
    def scope(self) -> Scope:
        return Scope.USER if self.hive == "HKCU" else Scope.DEVICE

    @property
    def install_path(self) -> str:
        return f"{self.hive}\\{self.install_key}"

    @property
    def node_path(self) -> str:
        head, sep, leaf = self.install_path.rpartition("\\")
        return head if sep and leaf.casefold() == "install" else self.install_path


@dataclass(frozen=True)
class AttemptOutcome:
    unique_id: str
    status: ScepStatus
    hresult: int
    attempt: int
    attempts: int
    final: bool  # the task is gone: success, or the last attempt failed
    thumbprint: str = ""
    respondent: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status is ScepStatus.FINISHED

    def as_dict(self) -> dict[str, Any]:
        return {"unique_id": self.unique_id, "status": int(self.status),
                "error_code": format_hex(self.hresult), "attempt": self.attempt,
                "attempts": self.attempts, "final": self.final, "thumbprint": self.thumbprint,
                "respondent_server_url": self.respondent, "message": self.message}


def _check_installable(result: EnrollResult) -> None:
    """The SCEP core reads only the fields it needs; the store takes strict DER only, so a
    certificate cryptography would refuse fails the attempt here, before anything is written."""
    for cert in (result.certificate, *result.chain):
        try:
            cert.to_x509()
        except ValueError as exc:
            raise PeerError(f"the CA returned a certificate that is not valid DER "
                            f"({cert.subject}): {exc}",
                            hresult=HResult.CRYPT_E_BAD_ENCODE) from None


class _Failure(Exception):
    """Internal: carries a failure's HRESULT and text to the single bookkeeping place."""

    def __init__(self, hresult: int, message: str, status: ScepStatus = ScepStatus.FAILED,
                 respondent: str = "") -> None:
        super().__init__(message)
        self.hresult = hresult
        self.message = message
        self.status = status
        self.respondent = respondent


class Certinst:
    """Runs attempts for one device. `clock` and `sleep` are injectable for tests."""

    def __init__(self, ctx: DeviceContext, *, clock: Callable[[], float] = time.time,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.ctx = ctx
        self.clock = clock
        self.sleep = sleep
        self.registry = ctx.registry
        self.tasks = TaskStore(ctx.registry)
        self.certs = CertStore(ctx.registry)

    def sid_for(self, req: CertinstRequest) -> str:
        return self.ctx.device.user_sid if req.hive == "HKCU" else SYSTEM_SID

    def find_task(self, req: CertinstRequest) -> TaskRecord | None:
        name = task_name(req.unique_id, self.sid_for(req)).casefold()
        for task in self.tasks.find_by_unique_id(req.unique_id):
            if task.name.casefold() == name:
                return task
        return None

    async def run(self, req: CertinstRequest) -> AttemptOutcome:
        with self._node_lock(req):
            return await self._attempt(req)

    # --- one attempt ---------------------------------------------------------------------------

    async def _attempt(self, req: CertinstRequest) -> AttemptOutcome:
        reg = self.registry
        if not reg.key_exists(req.install_path):
            self._drop_task(req)  # the node was deleted: nothing left to enroll
            raise NotFoundError(f"no SCEP Install node at {req.install_path}",
                                advice="the MDM server deleted the node, or -k/-h is wrong")
        with reg.transaction():
            task = self.find_task(req)
            if task is not None:
                task = self.tasks.record_attempt(task.enrollment_id, task.name,
                                                 int(self.clock() * 1000))
            reg.set_dword(req.node_path, "Status", ScepStatus.IN_PROGRESS)
            reg.set_dword(req.node_path, "ErrorCode", HResult.S_OK)
        attempt = task.attempts_made if task else 1
        attempts = task.attempts if task else 1
        final = task is None or task.exhausted
        self._collect_orphan_keys(req)
        try:
            return await self._enroll(req, attempt, attempts)
        except _Failure as failure:
            return self._record_failure(req, failure, attempt, attempts, final)
        except Exception as exc:  # a bug must still leave a truthful Status/ErrorCode behind
            log.exception("%s: enrollment attempt crashed", req.unique_id)
            crash = _Failure(HResult.E_UNEXPECTED, f"internal error: {type(exc).__name__}")
            return self._record_failure(req, crash, attempt, attempts, final)

    async def _enroll(self, req: CertinstRequest, attempt: int, attempts: int) -> AttemptOutcome:
        from agent.csp.scep_values import read_install
        from agent.csr import CsrRequest
        from agent.scep.enroll import EnrollOptions, enroll
        from agent.scep.errors import ScepPendingError

        try:
            install = read_install(self.registry, self.ctx.sealer, req.install_path)
        except DmAgentError as exc:
            raise _Failure(exc.hresult, f"cannot read the Install node: {exc.message}") from None
        url = ";".join(install.server_urls)
        if not install.challenge:
            raise _Failure(HResult.E_INVALIDARG,
                           "the Install node has no Challenge (already used by an earlier "
                           "attempt, or never sent)", respondent=url)
        try:
            store, key = await self._key_for(req, install.key_protection, install.key_length,
                                             install.container_name)
            csr = CsrRequest(
                subject=install.subject_name,
                subject_alt_names=";".join(f"{k}+{v}" for k, v in
                                           install.subject_alternative_names),
                key_usage=install.key_usage, eku="+".join(install.eku_mapping),
                template_name=install.template_name, valid_period=install.valid_period,
                valid_period_units=install.valid_period_units or "",
                hash_algorithm="+".join(install.hash_algorithms), challenge=install.challenge)
            self.ctx.events.write(ev_request_generated(
                "+".join(install.eku_mapping), url, install.container_name,
                install.key_protection, _STORE_LOCATION[req.scope]))
            result = await enroll(
                EnrollOptions(server_url=url, csr=csr, ca_thumbprint=install.ca_thumbprint,
                              retry_delay_minutes=install.retry_delay,
                              retry_count=install.retry_count),
                key, config=self.ctx.config.scep, sleep=self.sleep,
                minute_seconds=self.ctx.config.tasks.minute_seconds)
            _check_installable(result)
        except ScepPendingError as exc:
            raise _Failure(HResult.E_PENDING, exc.message, ScepStatus.PENDING, url) from None
        except DmAgentError as exc:
            raise _Failure(exc.hresult, exc.message, respondent=url) from None
        except KeyStoreError as exc:
            raise _Failure(exc.hresult, exc.message, respondent=url) from None
        return self._install(req, store, key, result, attempt, attempts)

    async def _key_for(self, req: CertinstRequest, key_protection: int, key_length: int,
                       container: str) -> tuple[KeyStore, KeyHandle]:
        """The key this node enrolls with: the recorded pending key, else a new one (recorded
        in the same breath, so a crash never loses track of it)."""
        pending = self.registry.query(req.node_path, PENDING_KEY_ID)
        kind = self.registry.query(req.node_path, PENDING_KEY_STORE)
        if isinstance(pending, str) and isinstance(kind, str):
            try:
                store = self.ctx.keystore(kind)
                return store, await asyncio.to_thread(store.load, pending)
            except KeyStoreError:
                log.info("pending key %s of %s is gone; making a new one", pending,
                         req.unique_id)
        store = await asyncio.to_thread(self.ctx.select_keystore, key_protection)
        spec = KeySpec(size=key_length, label=req.unique_id)
        store.check(spec)
        key = await asyncio.to_thread(store.create, spec)
        with self.registry.transaction():
            self.registry.set_sz(req.node_path, PENDING_KEY_ID, key.key_id)
            self.registry.set_sz(req.node_path, PENDING_KEY_STORE, store.kind)
        log.info("created %s key %s (RSA-%d) for %s", store.kind, key.key_id, key_length,
                 req.unique_id)
        return store, key

    def _install(self, req: CertinstRequest, store: KeyStore, key: KeyHandle,
                 result: EnrollResult, attempt: int, attempts: int) -> AttemptOutcome:
        reg = self.registry
        der = result.certificate.der
        replaced: list[tuple[str, str]] = []
        with reg.transaction():
            for old in self.certs.by_unique_id(req.scope, req.unique_id):
                if old.key_id and old.key_id != key.key_id:
                    replaced.append((old.key_store, old.key_id))
                self.certs.delete(req.scope, StoreName.MY, old.thumbprint)
            stored = self.certs.add(req.scope, StoreName.MY, der, key_id=key.key_id,
                                    key_store=store.kind, unique_id=req.unique_id)
            # The chain from the CertRep and the issuing CA from GetCACert go to the CA
            # (intermediate) store for chain building; nothing is made a trusted root here.
            for ca_cert in (*result.chain, result.ca.ca):
                if ca_cert != result.certificate:
                    self.certs.add(req.scope, StoreName.CA, ca_cert.der)
            reg.set_sz(req.node_path, "CertThumbprint", stored.thumbprint)
            reg.set_dword(req.node_path, "Status", ScepStatus.FINISHED)
            reg.set_dword(req.node_path, "ErrorCode", HResult.S_OK)
            reg.set_sz(req.node_path, "RespondentServerUrl", result.respondent_url)
            reg.delete_value(req.node_path, PENDING_KEY_ID)
            reg.delete_value(req.node_path, PENDING_KEY_STORE)
            self._finish(req)
        for kind, key_id in replaced:
            self._delete_key(kind, key_id)
        self.ctx.events.write(ev_install_from_reg(
            req.unique_id, stored.thumbprint, result.respondent_url, ScepStatus.FINISHED,
            attempt, HResult.S_OK))
        self.ctx.events.write(ev_cert_installed(req.unique_id, stored.thumbprint))
        log.info("%s: certificate %s installed (attempt %d/%d)", req.unique_id,
                 stored.thumbprint, attempt, attempts)
        return AttemptOutcome(req.unique_id, ScepStatus.FINISHED, HResult.S_OK, attempt,
                              attempts, True, stored.thumbprint, result.respondent_url,
                              "Certificate installed successfully.")

    def _record_failure(self, req: CertinstRequest, failure: _Failure, attempt: int,
                        attempts: int, final: bool) -> AttemptOutcome:
        reg = self.registry
        pending_key: tuple[str, str] | None = None
        with reg.transaction():
            reg.set_dword(req.node_path, "Status", failure.status)
            reg.set_dword(req.node_path, "ErrorCode", failure.hresult)
            if failure.respondent:
                reg.set_sz(req.node_path, "RespondentServerUrl", failure.respondent)
            if final:
                key_id = reg.query(req.node_path, PENDING_KEY_ID)
                kind = reg.query(req.node_path, PENDING_KEY_STORE)
                if isinstance(key_id, str) and isinstance(kind, str):
                    pending_key = (kind, key_id)
                reg.delete_value(req.node_path, PENDING_KEY_ID)
                reg.delete_value(req.node_path, PENDING_KEY_STORE)
                self._finish(req)
        if pending_key is not None:
            self._delete_key(*pending_key)
        self.ctx.events.write(ev_install_from_reg(
            req.unique_id, "", failure.respondent, failure.status, attempt, failure.hresult))
        self.ctx.events.write(ev_log_error(req.unique_id, failure.message))
        self.ctx.events.write(ev_enroll_failed(req.unique_id, failure.hresult))
        log.warning("%s: attempt %d/%d failed: %s (%s)", req.unique_id, attempt, attempts,
                    failure.message, format_hex(failure.hresult))
        return AttemptOutcome(req.unique_id, failure.status, failure.hresult, attempt,
                              attempts, final, "", failure.respondent, failure.message)

    # --- bookkeeping -------------------------------------------------------------------------

    def _finish(self, req: CertinstRequest) -> None:
        """After success or the last attempt: the Challenge and the task go (seed 000)."""
        from agent.csp.scep_values import CHALLENGE

        self.registry.delete_value(req.install_path, CHALLENGE)
        self._drop_task(req)
        if self.ctx.config.sync.alert_1226:
            from agent.omadm import ALERT_FLAG

            self.registry.set_dword(req.node_path, ALERT_FLAG, 1)  # sent at the next session

    def _drop_task(self, req: CertinstRequest) -> None:
        task = self.find_task(req)
        if task is not None:
            self.tasks.delete(task.enrollment_id, task.name)

    def _delete_key(self, kind: str, key_id: str) -> None:
        try:
            self.ctx.keystore(kind).delete(key_id)
        except KeyStoreError as exc:  # e.g. the TPM is away: the next sweep retries
            log.warning("could not delete %s key %s: %s", kind, key_id, exc.message)

    def _collect_orphan_keys(self, req: CertinstRequest) -> None:
        """Delete keys labelled with this UniqueID that no record points to (a killed attempt
        between key creation and its record, or a replaced certificate whose key deletion was
        cut short)."""
        kinds = ["software"] + (["tpm"] if self.ctx.config.tpm.tcti else [])
        pending = self.registry.query(req.node_path, PENDING_KEY_ID)
        linked = {c.key_id for c in self.certs.by_unique_id(req.scope, req.unique_id)}
        keep = linked | ({pending} if isinstance(pending, str) else set())
        for kind in kinds:
            try:
                store = self.ctx.keystore(kind)
                for key_id in store.list_ids():
                    if key_id in keep:
                        continue
                    if store.load(key_id).spec.label.casefold() == req.unique_id.casefold():
                        log.info("removing orphan %s key %s of %s", kind, key_id,
                                 req.unique_id)
                        store.delete(key_id)
            except KeyStoreError as exc:
                log.warning("orphan key sweep of the %s store skipped: %s", kind, exc.message)

    @contextmanager
    def _node_lock(self, req: CertinstRequest) -> Iterator[None]:
        locks = self.ctx.config.state_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(f"{req.hive}\\{req.unique_id}".casefold().encode()).hexdigest()
        fd = os.open(locks / f"certinst-{digest[:24]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateLockedError(
                    f"an enrollment attempt for {req.unique_id} is already running") from None
            yield
        finally:
            os.close(fd)
