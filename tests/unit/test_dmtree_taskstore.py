"""Task records: Windows TaskCache location, naming, idempotent create, attempts."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import LocalError, NotFoundError
from agent.registry import Registry, RegType, Rollback
from agent.taskstore import SYSTEM_SID, TASKS_ROOT, TaskStore, certinst_action, task_name

EID = "81D43C39-0417-4466-8D6E-553DD5C3358F"
UID = "ModelName_AC_x_LogicalName_y_Hash_1"
KEY = r"Software\Microsoft\SCEP\MS DM Server\ModelName_AC_x_LogicalName_y_Hash_1\Install"


@pytest.fixture
def tasks(tmp_path: Path) -> TaskStore:
    return TaskStore(Registry(tmp_path / "r.db", current_user_sid="S-1-12-1-1-2-3-4"))


def test_create_writes_the_windows_task_cache(tasks: TaskStore) -> None:
    t = tasks.create(EID, UID, hive="HKLM", install_key=KEY, sid=SYSTEM_SID, now_ms=1234)
    assert t.name == UID + "S-1-5-18" == task_name(UID, SYSTEM_SID)
    assert t.key == (r"HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Schedule\TaskCache"
                     rf"\Tree\Microsoft\Windows\EnterpriseMgmt\{EID}\{UID}S-1-5-18")
    values = {v.name: (v.type, v.data) for v in tasks.registry.values(t.key)}
    assert values["Action"] == (RegType.REG_SZ,
                                f'dmagent certinst -s -k "{KEY}" -h HKLM -t {UID}')
    assert values["Attempts"] == (RegType.REG_DWORD, 3)
    assert values["AttemptsMade"] == (RegType.REG_DWORD, 0)
    assert values["IntervalSeconds"] == (RegType.REG_DWORD, 60)
    assert values["NextRun"] == (RegType.REG_QWORD, 1234)
    assert values["Hive"] == (RegType.REG_SZ, "HKLM")
    assert values["InstallKey"] == (RegType.REG_SZ, KEY)
    assert values["UniqueID"] == (RegType.REG_SZ, UID)
    assert values["Id"][1].startswith("{") and len(values["Id"][1]) == 38
    assert tasks.get(EID, t.name) == t
    assert tasks.list() == [t] and tasks.list(EID) == [t] and tasks.list("other") == []


def test_create_is_idempotent_and_rearms(tasks: TaskStore) -> None:
    first = tasks.create(EID, UID, hive="HKCU", install_key=KEY, sid="S-1-12-1-1-2-3-4",
                         now_ms=1000)
    tasks.record_attempt(EID, first.name, 2000)
    tasks.record_attempt(EID, first.name, 62000)
    again = tasks.create(EID, UID, hive="HKCU", install_key=KEY, sid="S-1-12-1-1-2-3-4",
                         now_ms=99000)
    assert (again.id, again.attempts_made, again.next_run_ms) == (first.id, 0, 99000)
    assert again.action.endswith(f"-h HKCU -t {UID}")
    assert len(tasks.list()) == 1


def test_record_attempt_counts_and_schedules(tasks: TaskStore) -> None:
    t = tasks.create(EID, UID, hive="HKLM", install_key=KEY, sid=SYSTEM_SID, now_ms=0,
                     attempts=2, interval_seconds=30)
    one = tasks.record_attempt(EID, t.name, 10_000)
    assert (one.attempts_made, one.next_run_ms, one.exhausted) == (1, 40_000, False)
    two = tasks.record_attempt(EID, t.name, 40_000)
    assert two.exhausted and tasks.get(EID, t.name) == two


def test_delete_and_errors(tasks: TaskStore) -> None:
    t = tasks.create(EID, UID, hive="HKLM", install_key=KEY, sid=SYSTEM_SID, now_ms=0)
    assert tasks.find_by_unique_id(UID.upper()) == [t]
    assert tasks.delete(EID, t.name) and not tasks.delete(EID, t.name)
    assert tasks.find(EID, t.name) is None
    with pytest.raises(NotFoundError):
        tasks.get(EID, t.name)
    with pytest.raises(NotFoundError):
        tasks.record_attempt(EID, t.name, 0)
    with pytest.raises(LocalError):
        tasks.create(EID, UID, hive="HKU", install_key=KEY, sid=SYSTEM_SID,  # type: ignore[arg-type]
                     now_ms=0)
    with pytest.raises(LocalError):
        tasks.create(EID, UID, hive="HKLM", install_key=KEY, sid=SYSTEM_SID, now_ms=0,
                     attempts=0)
    assert tasks.registry.key_exists(TASKS_ROOT)


def test_create_joins_the_callers_transaction(tasks: TaskStore) -> None:
    with tasks.registry.transaction():
        tasks.create(EID, UID, hive="HKLM", install_key=KEY, sid=SYSTEM_SID, now_ms=0)
        raise Rollback
    assert tasks.list() == []


def test_action_line_quotes_the_key() -> None:
    assert certinst_action(r"Software\A B\Install", "HKLM", "U") == (
        r'dmagent certinst -s -k "Software\A B\Install" -h HKLM -t U')
