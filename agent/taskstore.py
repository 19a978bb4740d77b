"""Task records: the Task Scheduler analog, kept in the registry where Windows caches tasks.

When the DM client accepts `Exec .../Install/Enroll` it registers a scheduled task in the
`\\Microsoft\\Windows\\EnterpriseMgmt\\<EnrollmentId>\\` folder whose action runs dmcertinst;
the trigger allows 3 attempts, 1 minute apart (seed 000). Windows keeps its task cache under
`HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\Schedule\\TaskCache\\Tree\\...`; the
agent keeps each task there as one key with plain values, so a restart re-arms exactly what was
pending and a rolled-back Atomic leaves no task behind (the record is a store write).

The task name is the UniqueID with the SID of the account it runs for appended: the well-known
SYSTEM SID S-1-5-18 for device certificates, the user's SID for user certificates (seed 000).

This is a small data API; the scheduler that runs due tasks is built on top of it.
"""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass, replace
from typing import Final, Literal

from agent.errors import LocalError, NotFoundError
from agent.registry import Registry, RegType

TASKS_ROOT: Final = (r"HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Schedule\TaskCache"
                     r"\Tree\Microsoft\Windows\EnterpriseMgmt")
SYSTEM_SID: Final = "S-1-5-18"
DEFAULT_ATTEMPTS: Final = 3
DEFAULT_INTERVAL_SECONDS: Final = 60
AGENT_COMMAND: Final = "dmagent"

Hive = Literal["HKLM", "HKCU"]


@dataclass(frozen=True)
class TaskRecord:
    enrollment_id: str
    name: str
    id: str  # "{GUID}", stable across re-arming
    action: str  # the command line the task runs
    attempts: int
    attempts_made: int
    interval_seconds: int
    next_run_ms: int  # epoch milliseconds
    unique_id: str
    hive: Hive
    install_key: str  # the Install key path without the hive, as passed to -k

    @property
    def key(self) -> str:
        return task_key(self.enrollment_id, self.name)

    @property
    def exhausted(self) -> bool:
        return self.attempts_made >= self.attempts


def task_key(enrollment_id: str, name: str) -> str:
    return f"{TASKS_ROOT}\\{enrollment_id}\\{name}"


def task_name(unique_id: str, sid: str) -> str:
    """UniqueID with the SID appended, as Windows names the dmcertinst task."""
    return f"{unique_id}{sid}"


def certinst_action(install_key: str, hive: Hive, unique_id: str) -> str:
    """`dmcertinst.exe -s -k "<key>" -h HKLM -t <UniqueID>`, with the agent as the binary."""
    return f'{AGENT_COMMAND} certinst -s -k "{install_key}" -h {hive} -t {unique_id}'


class TaskStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def create(self, enrollment_id: str, unique_id: str, *, hive: Hive, install_key: str,
               sid: str, now_ms: int, attempts: int = DEFAULT_ATTEMPTS,
               interval_seconds: int = DEFAULT_INTERVAL_SECONDS) -> TaskRecord:
        """Register (or re-arm) the enrollment task for a SCEP node, due now.

        Idempotent: a second Exec Enroll for the same node keeps the task's Id, resets the
        attempts made and makes it due again."""
        if hive not in ("HKLM", "HKCU"):
            raise LocalError(f"task hive must be HKLM or HKCU, not {hive!r}")
        if attempts < 1 or interval_seconds < 0:
            raise LocalError("a task needs at least one attempt and a non-negative interval")
        name = task_name(unique_id, sid)
        with self.registry.transaction():
            existing = self.find(enrollment_id, name)
            record = TaskRecord(
                enrollment_id=enrollment_id, name=name,
                id=existing.id if existing else "{" + str(uuid.uuid4()).upper() + "}",
                action=certinst_action(install_key, hive, unique_id), attempts=attempts,
                attempts_made=0, interval_seconds=int(interval_seconds), next_run_ms=now_ms,
                unique_id=unique_id, hive=hive, install_key=install_key)
            self._write(record)
        return record

    def get(self, enrollment_id: str, name: str) -> TaskRecord:
        record = self.find(enrollment_id, name)
        if record is None:
            raise NotFoundError(f"no task {name} for enrollment {enrollment_id}",
                                advice="`dmagent tasks list` shows the pending tasks")
        return record

    def find(self, enrollment_id: str, name: str) -> TaskRecord | None:
        key = task_key(enrollment_id, name)
        if not self.registry.key_exists(key):
            return None
        values = {v.name.casefold(): v.data for v in self.registry.values(key)}

        def sz(name: str) -> str:
            value = values.get(name.casefold())
            return value if isinstance(value, str) else ""

        def num(name: str, default: int = 0) -> int:
            value = values.get(name.casefold())
            return value if isinstance(value, int) else default

        hive = sz("Hive")
        stored = self.registry.key_path(key).rsplit("\\", 2)
        return TaskRecord(
            enrollment_id=stored[1], name=stored[2], id=sz("Id"), action=sz("Action"),
            attempts=num("Attempts", DEFAULT_ATTEMPTS), attempts_made=num("AttemptsMade"),
            interval_seconds=num("IntervalSeconds", DEFAULT_INTERVAL_SECONDS),
            next_run_ms=num("NextRun"), unique_id=sz("UniqueID"),
            hive="HKCU" if hive.upper() == "HKCU" else "HKLM", install_key=sz("InstallKey"))

    def list(self, enrollment_id: str | None = None) -> list[TaskRecord]:
        if not self.registry.key_exists(TASKS_ROOT):
            return []
        enrollments = [enrollment_id] if enrollment_id else self.registry.subkeys(TASKS_ROOT)
        out: builtins.list[TaskRecord] = []
        for eid in enrollments:
            folder = f"{TASKS_ROOT}\\{eid}"
            if not self.registry.key_exists(folder):
                continue
            for name in self.registry.subkeys(folder):
                record = self.find(eid, name)
                if record is not None:
                    out.append(record)
        return out

    def find_by_unique_id(self, unique_id: str) -> builtins.list[TaskRecord]:
        return [t for t in self.list() if t.unique_id.casefold() == unique_id.casefold()]

    def delete(self, enrollment_id: str, name: str) -> bool:
        return self.registry.delete_key(task_key(enrollment_id, name))

    def record_attempt(self, enrollment_id: str, name: str, now_ms: int) -> TaskRecord:
        """Count one attempt and schedule the next one `interval` later."""
        with self.registry.transaction():
            record = self.get(enrollment_id, name)
            updated = replace(record, attempts_made=record.attempts_made + 1,
                              next_run_ms=now_ms + record.interval_seconds * 1000)
            self._write(updated)
        return updated

    def _write(self, record: TaskRecord) -> None:
        key = record.key
        reg = self.registry
        reg.set_sz(key, "Id", record.id)
        reg.set_sz(key, "Action", record.action)
        reg.set_dword(key, "Attempts", record.attempts)
        reg.set_dword(key, "AttemptsMade", record.attempts_made)
        reg.set_dword(key, "IntervalSeconds", record.interval_seconds)
        reg.set_value(key, "NextRun", RegType.REG_QWORD, record.next_run_ms)
        reg.set_sz(key, "UniqueID", record.unique_id)
        reg.set_sz(key, "Hive", record.hive)
        reg.set_sz(key, "InstallKey", record.install_key)
