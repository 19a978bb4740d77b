"""`dmagent reg|error|events|version` as a user runs them (separate processes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agent.diagnostics import ev_csp_execute, ev_enroll_failed
from agent.events import EventLog
from tests.conftest import CliResult

Cli = Callable[..., CliResult]
UID = "ModelName_AC_dede853d_LogicalName_286033f4_Hash_68180377"
BASE = r"HKLM\Software\Microsoft\SCEP\MS DM Server" + "\\" + UID


def seed_registry(run_cli: Cli) -> None:
    for args in (
        (BASE + r"\Install", "/v", "ServerURL", "/d", "https://ndes.example/certsrv/mscep/"),
        (BASE + r"\Install", "/v", "KeyLength", "/t", "REG_DWORD", "/d", "2048"),
        (BASE, "/v", "Status", "/t", "REG_DWORD", "/d", "16"),
        (BASE, "/v", "ErrorCode", "/t", "REG_DWORD", "/d", "-2145844844"),
    ):
        r = run_cli("reg", "add", *args, "/f")
        assert r.returncode == 0, r.stderr


def test_reg_query_recursive_prints_like_reg_exe(run_cli: Cli) -> None:
    seed_registry(run_cli)
    r = run_cli("reg", "query", r"HKLM\Software\Microsoft\SCEP", "/s")
    assert r.returncode == 0, r.stderr
    long_base = BASE.replace("HKLM", "HKEY_LOCAL_MACHINE")
    assert r.stdout.splitlines() == [
        "", r"HKEY_LOCAL_MACHINE\Software\Microsoft\SCEP",
        "", r"HKEY_LOCAL_MACHINE\Software\Microsoft\SCEP\MS DM Server",
        "", long_base,
        "    ErrorCode    REG_DWORD    0x80190194",
        "    Status    REG_DWORD    0x10",
        "", long_base + r"\Install",
        "    KeyLength    REG_DWORD    0x800",
        "    ServerURL    REG_SZ    https://ndes.example/certsrv/mscep/",
        "",
    ]


def test_reg_query_lists_subkeys_without_s_and_json(run_cli: Cli) -> None:
    seed_registry(run_cli)
    r = run_cli("reg", "query", BASE.lower())
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[-1] == ""
    assert lines[-2] == BASE.replace("HKLM", "HKEY_LOCAL_MACHINE") + r"\Install"
    r = run_cli("reg", "query", BASE, "/v", "errorcode", "--json")
    data = json.loads(r.stdout)
    assert data[0]["values"] == [{"name": "ErrorCode", "type": "REG_DWORD",
                                  "data": 0x80190194, "text": "0x80190194"}]


def test_reg_missing_key_exit_code_and_message(run_cli: Cli) -> None:
    r = run_cli("reg", "query", r"HKLM\Software\Nope")
    assert r.returncode == 5
    assert r.stderr.startswith("dmagent: error: registry key not found")
    r = run_cli("reg", "query", r"HKXX\Software")
    assert r.returncode == 1 and "invalid registry root" in r.stderr
    r = run_cli("reg", "delete", r"HKLM\Software\Nope", "/f")
    assert r.returncode == 5


def test_reg_export_writes_utf16_reg_file(run_cli: Cli, tmp_path: Path) -> None:
    seed_registry(run_cli)
    out = tmp_path / "scep.reg"
    r = run_cli("reg", "export", r"HKLM\Software\Microsoft\SCEP", str(out))
    assert r.returncode == 0, r.stderr
    raw = out.read_bytes()
    assert raw.startswith(b"\xff\xfe")
    text = raw[2:].decode("utf-16-le")
    assert text.startswith("Windows Registry Editor Version 5.00\r\n")
    assert '"ErrorCode"=dword:80190194\r\n' in text
    assert '"KeyLength"=dword:00000800\r\n' in text
    assert run_cli("reg", "export", r"HKLM\Software\Microsoft\SCEP", str(out)).returncode == 1
    assert run_cli("reg", "export", r"HKLM\Software\Microsoft\SCEP", str(out), "/y"
                   ).returncode == 0


def test_error_decodes_like_certutil(run_cli: Cli) -> None:
    r = run_cli("error", "-2145844844")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "0x80190194 (HTTP_E_STATUS_NOT_FOUND) -- 2149122452 (-2145844844)",
        "Error message text: Not found (404).",
    ]
    r = run_cli("error", "0x80092004", "--json")
    assert json.loads(r.stdout)["name"] == "CRYPT_E_NOT_FOUND"
    r = run_cli("error", "banana")
    assert r.returncode == 1 and "not an error code" in r.stderr


def test_events_lists_and_filters(run_cli: Cli, state_dir: Path) -> None:
    log = EventLog(state_dir / "events.jsonl", device="d1")
    log.write(ev_csp_execute(UID, "S-1-5-18", "device", 3, 0))
    log.write(ev_enroll_failed(UID, 0x80190194))
    r = run_cli("events")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert " 306  SCEP: CspExecute for UniqueId : (" + UID in lines[0]
    assert lines[1].endswith("SCEP: Certificate enroll failed. Result: (Not found (404).).")
    r = run_cli("events", "--id", "32", "--json")
    assert [e["id"] for e in json.loads(r.stdout)] == [32]


def test_version_and_usage_errors(run_cli: Cli) -> None:
    r = run_cli("version", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["dmagent"]
    r = run_cli("no-such-command")
    assert r.returncode == 2
    r = run_cli("--help")
    assert "exit codes:" in r.stdout and "reg" in r.stdout


def test_config_error_exit_code(run_cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nurl = 1\n")
    r = run_cli("--config", str(bad), "reg", "query", "HKLM")
    assert r.returncode == 3
    assert f"{bad}: server.url: expected str, got 1" in r.stderr
