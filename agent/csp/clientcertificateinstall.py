"""ClientCertificateInstall CSP, SCEP part: `./{Device|User}/Vendor/MSFT/ClientCertificateInstall`.

Persisted where the Windows client keeps it (seed 000):
- `HKLM\\Software\\Microsoft\\SCEP\\<ProviderID>\\<UniqueID>\\Install` holds the Install nodes
  (`HKU\\<SID>\\Software\\...` for `./User`), int nodes as REG_DWORD, chr nodes as REG_SZ;
  the Challenge is sealed (DPAPI on Windows) into a REG_BINARY and never read back over the
  wire;
- `...\\<UniqueID>` holds what the enrollment job reports: Status, ErrorCode (the HRESULT as a
  DWORD; Get answers it as signed decimal), CertThumbprint, RespondentServerUrl.

`Exec .../Install/Enroll` is answered 200 at once (the work is asynchronous, as on Windows):
it sets Status 32 (in progress), registers the dmcertinst task (`agent.taskstore`) and logs
event 306 CspExecute. The task record is a store write, so an Atomic that rolls back leaves
no task; the event is written only after the transaction commits (see `Deferred`) — Windows
logs 306 even when the Atomic fails, but a log line for a task that does not exist would
mislead whoever reads it.

`Delete .../SCEP/<UniqueID>` removes the node, its task and its certificate (through the
removal hooks; by default the certificate store's My certificates of that UniqueID).
PFXCertInstall is not implemented: anything below it answers 406.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from agent.csp.scep_values import (
    CHALLENGE,
    INSTALL_BY_NAME,
    INSTALL_NODES,
    KEY_PROTECTION_DEFAULT,
    challenge_purpose,
)
from agent.diagnostics import HResult, ScepStatus, ev_csp_execute, to_signed
from agent.dmtree.csp import (
    ADGR,
    CSP,
    Deferred,
    ItemValue,
    NodeSpec,
    NodeValue,
    Op,
    Resolved,
    Value,
    interior,
    leaf,
)
from agent.dmtree.errors import DMStatusError, not_allowed, not_found
from agent.dmtree.uri import Scope
from agent.enrollment import DEFAULT_PROVIDER_ID, Enrollment
from agent.registry import Registry, RegType
from agent.syncml.messages import Format, StatusCode
from agent.taskstore import (
    DEFAULT_ATTEMPTS,
    DEFAULT_INTERVAL_SECONDS,
    SYSTEM_SID,
    Hive,
    TaskStore,
    task_name,
)

if TYPE_CHECKING:
    from agent.events import EventLog
    from agent.sealing import Sealer

SCEP_KEY: Final = r"Software\Microsoft\SCEP"
STATUS_LEAVES: Final = ("CertThumbprint", "Status", "ErrorCode", "RespondentServerUrl")


@dataclass(frozen=True)
class ScepNodeRef:
    """A SCEP node being deleted, as the certificate-removal hooks see it."""

    scope: Scope
    provider_id: str
    unique_id: str
    node_key: str  # full registry path of ...\SCEP\<ProviderID>\<UniqueID>
    thumbprint: str  # the CertThumbprint recorded for it ("" when none)


# Called inside the store transaction of the Delete: registry writes roll back with it.
CertRemovalHook = Callable[[Registry, ScepNodeRef], None]


def remove_from_my(registry: Registry, ref: ScepNodeRef) -> None:
    """Default hook: drop the node's certificates from the scope's My store."""
    from agent.certstore import CertStore, StoreName
    from agent.certstore import Scope as StoreScope

    store = CertStore(registry)
    scope = StoreScope.USER if ref.scope is Scope.USER else StoreScope.DEVICE
    doomed = {c.thumbprint for c in store.by_unique_id(scope, ref.unique_id)}
    if ref.thumbprint:
        doomed.add(ref.thumbprint.upper())
    for tp in doomed:
        store.delete(scope, StoreName.MY, tp)


_INSTALL_SPECS = tuple(
    leaf(n.name, n.format,
         # The Challenge is write-only here: sealed at rest and never returned over the wire.
         Op.ADD | Op.DELETE | Op.REPLACE if n.name == CHALLENGE else ADGR)
    for n in INSTALL_NODES)

SCHEMA: Final = interior(
    "ClientCertificateInstall", Op.GET,
    interior("PFXCertInstall", Op.GET),
    interior("SCEP", Op.GET,
             interior("{UniqueID}", ADGR,
                      interior("Install", ADGR, *_INSTALL_SPECS,
                               leaf("Enroll", Format.NULL, Op.EXEC)),
                      leaf("CertThumbprint", Format.CHR, Op.GET),
                      leaf("Status", Format.INT, Op.GET),
                      leaf("ErrorCode", Format.INT, Op.GET),
                      leaf("RespondentServerUrl", Format.CHR, Op.GET))))


class ClientCertificateInstallCSP(CSP):
    schema: NodeSpec = SCHEMA

    def __init__(self, registry: Registry, sealer: Sealer, scope: Scope,
                 enrollment: Enrollment | None, *, deferred: Deferred,
                 events: EventLog | None = None, clock: Callable[[], float],
                 removal_hooks: Sequence[CertRemovalHook] = (),
                 task_attempts: int = DEFAULT_ATTEMPTS,
                 task_interval_seconds: int = DEFAULT_INTERVAL_SECONDS) -> None:
        if scope is Scope.GLOBAL:
            raise ValueError("ClientCertificateInstall lives in the Device or User scope")
        self.registry = registry
        self.sealer = sealer
        self.scope = scope
        self.enrollment = enrollment
        self.deferred = deferred
        self.events = events
        self.clock = clock
        self.removal_hooks = list(removal_hooks)
        self.task_attempts = task_attempts
        self.task_interval_seconds = task_interval_seconds
        self.provider_id = enrollment.provider_id if enrollment else DEFAULT_PROVIDER_ID
        self.hive: Hive = "HKCU" if scope is Scope.USER else "HKLM"
        self.hive_root = registry.hkcu() if scope is Scope.USER else "HKLM"
        self.sid = (registry.current_user_sid or "") if scope is Scope.USER else SYSTEM_SID

    # --- registry layout ---------------------------------------------------------------------

    @property
    def scep_root(self) -> str:
        return f"{self.hive_root}\\{SCEP_KEY}\\{self.provider_id}"

    def node_key(self, unique_id: str) -> str:
        return f"{self.scep_root}\\{unique_id}"

    def install_key(self, unique_id: str) -> str:
        return f"{self.node_key(unique_id)}\\Install"

    # --- schema hooks ------------------------------------------------------------------------

    def resolve(self, path: tuple[str, ...]) -> Resolved:
        if len(path) > 1 and path[0].casefold() == "pfxcertinstall":
            raise DMStatusError(StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED,
                                "PFX certificate installation is not supported by this agent")
        return super().resolve(path)

    def exists(self, r: Resolved) -> bool:
        pattern = r.pattern()
        if len(pattern) < 2:
            return True  # the CSP root, PFXCertInstall, SCEP
        uid = r.var("UniqueID")
        if len(pattern) == 2 or pattern[2] in STATUS_LEAVES:
            return self.registry.key_exists(self.node_key(uid))
        if len(pattern) == 3:
            return self.registry.key_exists(self.install_key(uid))
        if pattern[3] == "Enroll":
            return False  # an Exec-only node has no value
        return self.registry.query(self.install_key(uid), r.spec.name) is not None

    def children(self, r: Resolved) -> list[str]:
        if r.pattern() == ("SCEP",):
            if not self.registry.key_exists(self.scep_root):
                return []
            return self.registry.subkeys(self.scep_root)
        return super().children(r)

    def read(self, r: Resolved) -> NodeValue:
        uid = r.var("UniqueID")
        name = r.spec.name
        if len(r.pattern()) == 4:  # an Install value
            data = self.registry.query(self.install_key(uid), name)
            return NodeValue(r.spec.format, str(data) if data is not None else "")
        node = self.node_key(uid)
        status, error, thumb = self._status(node)
        if name == "Status":
            return NodeValue(Format.INT, str(status))
        if name == "ErrorCode":
            return NodeValue(Format.INT, str(to_signed(error)))
        if name == "CertThumbprint":
            return NodeValue(Format.CHR, thumb)
        url = self.registry.query(node, "RespondentServerUrl")
        return NodeValue(Format.CHR, url if isinstance(url, str) else "")

    def write(self, r: Resolved, value: Value, item: ItemValue) -> None:
        uid = r.var("UniqueID")
        node = INSTALL_BY_NAME[r.spec.name.casefold()]
        where = self.describe(r)
        node.validate(where, value)
        key = self.install_key(uid)
        if node.name == CHALLENGE:
            sealed = self.sealer.seal(str(value).encode(), challenge_purpose(self.registry, key))
            self.registry.set_value(key, CHALLENGE, RegType.REG_BINARY, sealed)
        elif node.format == Format.INT:
            assert isinstance(value, int)
            self.registry.set_dword(key, node.name, value)
        else:
            self.registry.set_sz(key, node.name, str(value))

    def create(self, r: Resolved) -> None:
        uid = r.var("UniqueID")
        key = self.node_key(uid) if len(r.path) == 2 else self.install_key(uid)
        self.registry.create_key(key)

    def remove(self, r: Resolved) -> None:
        uid = r.var("UniqueID")
        pattern = r.pattern()
        if len(pattern) == 2:
            self._remove_node(uid)
        elif len(pattern) == 3:
            self.registry.delete_key(self.install_key(uid))
        elif len(pattern) == 4:
            self.registry.delete_value(self.install_key(uid), r.spec.name)
        else:
            raise not_allowed("Delete", self.describe(r))

    def execute(self, r: Resolved, item: ItemValue) -> None:
        uid = r.var("UniqueID")
        if not self.registry.key_exists(self.install_key(uid)):
            raise not_found(f"{self.describe(r)}: the Install node has no values")
        if self.enrollment is None:
            raise DMStatusError(StatusCode.COMMAND_FAILED,
                                "no MDM enrollment: cannot schedule the enrollment task")
        # The stored spelling of the UniqueID names the task and goes into its command line.
        stored_uid = self.registry.key_path(self.node_key(uid)).rsplit("\\", 1)[1]
        node = self.node_key(stored_uid)
        self.registry.set_dword(node, "Status", ScepStatus.IN_PROGRESS)
        self.registry.set_dword(node, "ErrorCode", HResult.S_OK)
        install_rel = f"{SCEP_KEY}\\{self.provider_id}\\{stored_uid}\\Install"
        TaskStore(self.registry).create(
            self.enrollment.enrollment_id, stored_uid, hive=self.hive, install_key=install_rel,
            sid=self.sid, now_ms=int(self.clock() * 1000), attempts=self.task_attempts,
            interval_seconds=self.task_interval_seconds)
        protection = self.registry.query(self.install_key(stored_uid), "KeyProtection")
        record = ev_csp_execute(
            stored_uid, self.sid, "user" if self.scope is Scope.USER else "machine",
            protection if isinstance(protection, int) else KEY_PROTECTION_DEFAULT, HResult.S_OK)
        events = self.events
        if events is not None:
            self.deferred.defer(lambda: events.write(record))

    # --- internals ---------------------------------------------------------------------------

    def _status(self, node: str) -> tuple[int, int, str]:
        """(Status, ErrorCode, CertThumbprint) as the server should see them: a recorded
        certificate that is gone from the store turns into Status 16 / CRYPT_E_NOT_FOUND and
        an empty thumbprint, as a real Windows host answers after the certificate is deleted."""
        status = self.registry.query(node, "Status")
        error = self.registry.query(node, "ErrorCode")
        thumb = self.registry.query(node, "CertThumbprint")
        status_i = status if isinstance(status, int) else int(ScepStatus.IN_PROGRESS)
        error_i = error if isinstance(error, int) else 0
        thumb_s = thumb if isinstance(thumb, str) else ""
        if thumb_s and not self._cert_present(thumb_s):
            return int(ScepStatus.FAILED), int(HResult.CRYPT_E_NOT_FOUND), ""
        return status_i, error_i, thumb_s

    def _cert_present(self, thumbprint: str) -> bool:
        from agent.certstore import CertStore, StoreName
        from agent.certstore import Scope as StoreScope
        from agent.errors import DmAgentError

        scope = StoreScope.USER if self.scope is Scope.USER else StoreScope.DEVICE
        try:
            CertStore(self.registry).get(scope, StoreName.MY, thumbprint)
        except DmAgentError:
            return False
        return True

    def _remove_node(self, uid: str) -> None:
        node = self.node_key(uid)
        stored_uid = self.registry.key_path(node).rsplit("\\", 1)[1]
        thumb = self.registry.query(node, "CertThumbprint")
        ref = ScepNodeRef(self.scope, self.provider_id, stored_uid, node,
                          thumb if isinstance(thumb, str) else "")
        for hook in self.removal_hooks:
            hook(self.registry, ref)
        tasks = TaskStore(self.registry)
        for task in tasks.find_by_unique_id(stored_uid):
            if task.hive == self.hive and \
                    task.name.casefold() == task_name(stored_uid, self.sid).casefold():
                tasks.delete(task.enrollment_id, task.name)
        self.registry.delete_key(node)
