"""MDM enrollments (accounts) as Windows records them in the registry.

An enrollment ties together what the rest of the agent needs to name things the Windows way:
- `HKLM\\SOFTWARE\\Microsoft\\Enrollments\\<EnrollmentId>`: ProviderID, UPN, EnrollmentType,
  EnrollmentState; the task folder `EnterpriseMgmt\\<EnrollmentId>` is named after it;
- `HKLM\\SOFTWARE\\Microsoft\\Provisioning\\OMADM\\Accounts\\<AccountId>`: Addr (the DM server
  URL, APPLICATION w7 ADDR), ServerID (= ProviderID); the SCEP UniqueID carries `AC_<AccountId>`;
- the ProviderID names the SCEP hive key: `HKLM\\Software\\Microsoft\\SCEP\\<ProviderID>`
  (Intune's ProviderID is `MS DM Server`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.errors import NotFoundError
from agent.registry import Registry

ENROLLMENTS_KEY = r"HKLM\SOFTWARE\Microsoft\Enrollments"
ACCOUNTS_KEY = r"HKLM\SOFTWARE\Microsoft\Provisioning\OMADM\Accounts"
DEFAULT_PROVIDER_ID = "MS DM Server"
ENROLLMENT_TYPE_MDM = 6  # MDM enrollment (full device management), as Windows records it
ENROLLMENT_STATE_ENROLLED = 1


@dataclass(frozen=True)
class Enrollment:
    enrollment_id: str  # GUID, upper case, no braces (as the Enrollments subkey names)
    account_id: str  # OMADM account GUID (lower case, as in the UniqueID's AC_ part)
    provider_id: str
    server_url: str
    upn: str = ""

    @property
    def key(self) -> str:
        return f"{ENROLLMENTS_KEY}\\{self.enrollment_id}"

    @property
    def account_key(self) -> str:
        return f"{ACCOUNTS_KEY}\\{self.account_id}"


class EnrollmentStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def list(self) -> list[Enrollment]:
        if not self.registry.key_exists(ENROLLMENTS_KEY):
            return []
        out = []
        for eid in self.registry.subkeys(ENROLLMENTS_KEY):
            enrollment = self._read(eid)
            if enrollment is not None:
                out.append(enrollment)
        return out

    def get(self, enrollment_id: str) -> Enrollment:
        enrollment = self._read(enrollment_id)
        if enrollment is None:
            raise NotFoundError(f"no MDM enrollment {enrollment_id}")
        return enrollment

    def find_by_server(self, server_url: str) -> Enrollment | None:
        for enrollment in self.list():
            if enrollment.server_url == server_url:
                return enrollment
        return None

    def default(self) -> Enrollment | None:
        """The enrollment a plain `dmagent sync` uses: the only one, else the first by id."""
        enrollments = self.list()
        return enrollments[0] if enrollments else None

    def add(self, server_url: str, *, provider_id: str = DEFAULT_PROVIDER_ID, upn: str = "",
            enrollment_id: str | None = None, account_id: str | None = None) -> Enrollment:
        enrollment = Enrollment(
            enrollment_id=(enrollment_id or str(uuid.uuid4())).upper(),
            account_id=(account_id or str(uuid.uuid4())).lower(),
            provider_id=provider_id, server_url=server_url, upn=upn)
        reg = self.registry
        with reg.transaction():
            reg.set_sz(enrollment.key, "ProviderID", provider_id)
            reg.set_sz(enrollment.key, "UPN", upn)
            reg.set_sz(enrollment.key, "AccountID", enrollment.account_id)
            reg.set_dword(enrollment.key, "EnrollmentType", ENROLLMENT_TYPE_MDM)
            reg.set_dword(enrollment.key, "EnrollmentState", ENROLLMENT_STATE_ENROLLED)
            reg.set_sz(enrollment.account_key, "Addr", server_url)
            reg.set_sz(enrollment.account_key, "ServerID", provider_id)
            reg.set_sz(enrollment.account_key, "Name", provider_id)
        return enrollment

    def ensure(self, server_url: str, *, provider_id: str = DEFAULT_PROVIDER_ID,
               upn: str = "") -> Enrollment:
        """The enrollment for `server_url`, created on first use (`dmagent sync --server`)."""
        with self.registry.transaction():
            return self.find_by_server(server_url) or self.add(
                server_url, provider_id=provider_id, upn=upn)

    def remove(self, enrollment_id: str) -> None:
        enrollment = self.get(enrollment_id)
        with self.registry.transaction():
            self.registry.delete_key(enrollment.account_key)
            self.registry.delete_key(enrollment.key)

    def record_session(self, enrollment: Enrollment, ok: bool, when: float | None = None,
                       detail: str = "") -> None:
        """Note a management session's outcome where Windows does (ConnInfo, UTC stamps)."""
        stamp = _stamp(time.time() if when is None else when)
        key = conn_info_key(enrollment)
        with self.registry.transaction():
            self.registry.set_sz(key, "ServerLastAccessTime", stamp)
            self.registry.set_sz(key, "ServerLastSuccessTime" if ok else "ServerLastFailureTime",
                                 stamp)
            self.registry.set_sz(key, "LastSessionResult", detail or ("ok" if ok else "failed"))

    def last_session(self, enrollment: Enrollment) -> dict[str, str]:
        key = conn_info_key(enrollment)
        out = {}
        for name in ("ServerLastAccessTime", "ServerLastSuccessTime", "ServerLastFailureTime",
                     "LastSessionResult"):
            value = self.registry.query(key, name)
            if isinstance(value, str):
                out[name] = value
        return out

    def _read(self, enrollment_id: str) -> Enrollment | None:
        key = f"{ENROLLMENTS_KEY}\\{enrollment_id}"
        provider = self.registry.query(key, "ProviderID")
        account = self.registry.query(key, "AccountID")
        if not isinstance(provider, str) or not isinstance(account, str):
            return None
        addr = self.registry.query(f"{ACCOUNTS_KEY}\\{account}", "Addr")
        upn = self.registry.query(key, "UPN")
        return Enrollment(self.registry.key_path(key).rsplit("\\", 1)[1], account, provider,
                          addr if isinstance(addr, str) else "",
                          upn if isinstance(upn, str) else "")


def conn_info_key(enrollment: Enrollment) -> str:
    return f"{enrollment.account_key}\\Protected\\ConnInfo"


def _stamp(when: float) -> str:
    """ConnInfo time format: `20261122T021300Z`."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y%m%dT%H%M%SZ")
