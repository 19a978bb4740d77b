"""Pure parts of the service: the poll plan, systemd notify, the state lock."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.errors import StateLockedError
from agent.statelock import StateLock
from service.pollplan import next_poll_minutes
from service.systemd import notify, watchdog_interval

WINDOWS_DEFAULT = [(15, 10), (60, 16), (1440, 0)]


@pytest.mark.parametrize(("sets", "done", "expected"), [
    (WINDOWS_DEFAULT, 0, 15),
    (WINDOWS_DEFAULT, 9, 15),
    (WINDOWS_DEFAULT, 10, 60),
    (WINDOWS_DEFAULT, 25, 60),
    (WINDOWS_DEFAULT, 26, 1440),
    (WINDOWS_DEFAULT, 10_000, 1440),  # remaining set count 0: forever
    ([(15, 0), (60, 16)], 500, 15),  # first set forever
    ([(0, 10), (60, 2)], 0, 60),  # interval 0 disables a set
    ([(15, 2), (60, 1), (0, 0)], 3, None),  # exhausted
    ([], 0, None),
])
def test_next_poll_minutes(sets: list[tuple[int, int]], done: int, expected: int | None) -> None:
    assert next_poll_minutes(sets, done) == expected


def test_notify_sends_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1")
        assert server.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None


def test_state_lock_is_exclusive(tmp_path: Path) -> None:
    first = StateLock(tmp_path / "dmagent.lock")
    first.acquire()
    assert first.holder_pid() == os.getpid()
    with pytest.raises(StateLockedError, match=f"pid {os.getpid()}"):
        StateLock(tmp_path / "dmagent.lock").acquire()
    first.release()
    assert first.holder_pid() is None
    with StateLock(tmp_path / "dmagent.lock"):
        pass
