"""`make demo`'s command: the whole chain with real parts, its JSON summary, and clean-up."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CliResult

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_enrolls_device_tpm_and_user_software(run_cli: Callable[..., CliResult],
                                                   tmp_path: Path) -> None:
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    r = run_cli("lab", "demo", "--dir", str(tmp_path / "demo"), "--json", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    by_scope = {e["scope"]: e for e in summary["enrollments"]}
    assert set(by_scope) == {"device", "user"}
    assert by_scope["device"]["key_store"] == "tpm"
    assert by_scope["user"]["key_store"] == "software"
    for e in by_scope.values():
        assert (e["status"], e["error_code"]) == (1, "0x00000000")
        assert e["thumbprint"] and e["server_thumbprint"] == e["thumbprint"]
    assert [c["status"] for c in summary["crs"]] == ["issued", "issued"]
    assert (tmp_path / "demo" / "agent" / "registry.db").exists()
    # The parts the demo started are gone (their command lines name the demo dir).
    leftovers = []
    for pid in {p for p in os.listdir("/proc") if p.isdigit()} - before:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(name in cmd for name in ("swtpm", "scepserver")) and \
                str(tmp_path) in cmd:
            leftovers.append(cmd)
            os.kill(int(pid), signal.SIGKILL)
    assert leftovers == []
