"""Diagnostics (HRESULTs, events), sealing and configuration."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.config import load_config
from agent.diagnostics import (
    EventId,
    FailInfo,
    HResult,
    ev_enroll_failed,
    ev_install_from_reg,
    format_hex,
    hresult_from_http_status,
    hresult_from_win32,
    lookup_error,
    parse_hresult,
    to_signed,
)
from agent.errors import ConfigError
from agent.events import EventLog
from agent.sealing import Sealer, SealError, load_or_create_machine_key

# --- HRESULTs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "hr", "signed"), [
    (404, 0x80190194, -2145844844),
    (500, 0x801901F4, -2145844748),  # what a real Windows 11 host reports for a CA HTTP 500
    (503, 0x801901F7, -2145844745),
    (403, 0x80190193, -2145844845),
])
def test_http_status_hresults(status: int, hr: int, signed: int) -> None:
    assert hresult_from_http_status(status) == hr
    assert to_signed(hr) == signed
    assert lookup_error(hr).message.endswith(f"({status}).")


@pytest.mark.parametrize(("text", "value"), [
    ("0x80190194", 0x80190194), ("0X80190194", 0x80190194), ("80190194h", 0x80190194),
    ("-2145844844", 0x80190194), ("2149122452", 0x80190194), ("0", 0),
    ("-2146885628", 0x80092004),  # cert removed, as Windows reports it
])
def test_parse_hresult(text: str, value: int) -> None:
    assert parse_hresult(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0xZZ", "99999999999", "-99999999999"])
def test_parse_hresult_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hresult(text)


def test_win32_and_unknown_codes() -> None:
    assert hresult_from_win32(2) == 0x80070002
    assert hresult_from_win32(0) == 0
    d = lookup_error(2)
    assert (d.hresult, d.name, d.win32) == (0x80070002, "ERROR_FILE_NOT_FOUND", 2)
    assert lookup_error(0x80190199).name == "HTTP_E_STATUS_CONFLICT"
    assert lookup_error(0x801901C3).message == "HTTP status 451."
    assert lookup_error(0x8BADF00D).name == ""
    assert format_hex(-2145844844) == "0x80190194"


def test_every_hresult_has_a_message() -> None:
    assert all(member.message for member in HResult)
    assert {f.hresult for f in FailInfo} <= set(HResult)


def test_event_texts_follow_windows() -> None:
    ev = ev_enroll_failed("U1", 0x801901F4)
    assert ev.event_id is EventId.ENROLL_FAILED
    # Windows keeps the message's own period: "Result: (Gateway timeout (504).)." (seed 001)
    assert ev.message == "SCEP: Certificate enroll failed. Result: (Internal server error (500).)."
    ok = ev_install_from_reg("U1", "AB" * 20, "https://ndes/pkiclient.exe", 1, 1, 0)
    assert "Install Status : (0x1) Current Retry Count :  (0x1)" in ok.message
    assert "Result : (The operation completed successfully.)" in ok.message


def test_event_log_round_trip_and_torn_lines(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl", device="dev1", clock=lambda: 0.0)
    log.write(ev_enroll_failed("U1", 0x80190194))
    with (tmp_path / "events.jsonl").open("a") as fh:
        fh.write('{"time": "torn')  # what a crash mid-write could leave
    events = log.read()
    assert [(e.event_id, e.device) for e in events] == [(32, "dev1")]
    assert events[0].time.startswith("1970-01-01T00:00:00")
    assert stat.S_IMODE(os.stat(tmp_path / "events.jsonl").st_mode) == 0o600


# --- sealing ----------------------------------------------------------------------------------


def test_seal_round_trip_and_binding(tmp_path: Path) -> None:
    sealer = Sealer.from_state_dir(tmp_path)
    blob = sealer.seal(b"challenge-123", "HKLM\\X\\Challenge")
    assert b"challenge-123" not in blob
    assert sealer.unseal(blob, "HKLM\\X\\Challenge") == b"challenge-123"
    with pytest.raises(SealError, match="does not unseal"):
        sealer.unseal(blob, "HKLM\\Y\\Challenge")  # moved to another value
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealError):
        sealer.unseal(tampered, "HKLM\\X\\Challenge")
    with pytest.raises(SealError, match="format"):
        sealer.unseal(b"plain", "p")
    other = Sealer(os.urandom(32))
    with pytest.raises(SealError):
        other.unseal(blob, "HKLM\\X\\Challenge")


def test_machine_key_created_once_0600(tmp_path: Path) -> None:
    path = tmp_path / "machine.key"
    k1 = load_or_create_machine_key(path)
    k2 = load_or_create_machine_key(path)
    assert k1 == k2 and len(k1) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(SealError, match="readable by others"):
        load_or_create_machine_key(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(SealError, match="damaged"):
        load_or_create_machine_key(path)


# --- config -----------------------------------------------------------------------------------


def test_config_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('state_dir = "/from/file"\n[server]\nurl = "https://file/"\n'
                        "verify_tls = false\n[tasks]\nattempts = 5\n")
    env = {"DMAGENT_SERVER_URL": "https://env/", "DMAGENT_TASKS_INTERVAL_SECONDS": "0.5",
           "DMAGENT_SERVER_VERIFY_TLS": "yes"}
    cfg = load_config(cfg_file, env=env, overrides={"state_dir": tmp_path / "cli"})
    assert cfg.state_dir == tmp_path / "cli"
    assert cfg.server.url == "https://env/"
    assert cfg.server.verify_tls is True
    assert cfg.tasks.attempts == 5
    assert cfg.tasks.interval_seconds == 0.5
    assert cfg.source == str(cfg_file)


@pytest.mark.parametrize(("toml", "env", "message"), [
    ("[server]\nurl = 5\n", {}, "server.url: expected str"),
    ("[server]\nbogus = 1\n", {}, "unknown setting 'server.bogus'"),
    ("[tasks]\nattempts = 0\n", {}, "tasks.attempts must be at least 1"),
    ("", {"DMAGENT_TASKS_ATTEMPTS": "three"}, "environment variable DMAGENT_TASKS_ATTEMPTS"),
    ("", {"DMAGENT_SERVER_VERIFY_TLS": "maybe"}, "server.verify_tls: expected bool"),
    ("[server\n", {}, "invalid TOML"),
    ('log_level = "loud"\n', {}, "log_level must be one of"),
])
def test_config_errors_name_key_and_source(tmp_path: Path, toml: str, env: dict[str, str],
                                           message: str) -> None:
    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text(toml)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(cfg_file, env=env)
    if not env:
        assert str(cfg_file) in info.value.message


def test_config_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", env={})


def test_derived_device_identity_is_stable() -> None:
    cfg = load_config(None, env={"DMAGENT_DEVICE_DEVICE_ID": "dev-1"})
    d1, d2 = cfg.resolved_device(), cfg.resolved_device()
    assert d1.user_sid == d2.user_sid and d1.user_sid.startswith("S-1-12-1-")
    other = load_config(None, env={"DMAGENT_DEVICE_DEVICE_ID": "dev-2"}).resolved_device()
    assert other.user_sid != d1.user_sid


def test_example_config_is_valid_and_complete() -> None:
    """packaging/dmagent.example.toml loads, and names every setting (commented or not)."""
    from agent.config import _schema_keys

    example = Path(__file__).parents[2] / "packaging" / "dmagent.example.toml"
    load_config(example, env={})
    text = example.read_text()
    for dotted in _schema_keys():
        assert f"{dotted.rsplit('.', 1)[-1]} =" in text, dotted


def test_a_state_dir_keeps_its_identity(tmp_path: Path) -> None:
    """Opened later without the environment that created it (e.g. `dmagent --state-dir X
    status`), a device is still the same device: same DevId, same user SID, same HKCU."""
    from agent.device import DeviceContext

    first = DeviceContext(load_config(None, env={"DMAGENT_STATE_DIR": str(tmp_path),
                                                 "DMAGENT_DEVICE_DEVICE_ID": "dev-A",
                                                 "DMAGENT_DEVICE_NAME": "laptop-a"}))
    first.registry.set_sz(r"HKCU\Software\Probe", "v", "user hive")
    ident = first.device
    first.close()
    later = DeviceContext(load_config(None, env={"DMAGENT_STATE_DIR": str(tmp_path)}))
    assert (later.device.device_id, later.device.user_sid, later.device.name) == (
        "dev-A", ident.user_sid, "laptop-a")
    assert later.registry.query(r"HKCU\Software\Probe", "v") == "user hive"
    later.close()
    # An explicit setting still wins (and becomes what the store remembers).
    moved = DeviceContext(load_config(None, env={"DMAGENT_STATE_DIR": str(tmp_path),
                                                 "DMAGENT_DEVICE_DEVICE_ID": "dev-B"}))
    assert moved.device.device_id == "dev-B" and moved.device.user_sid != ident.user_sid
    moved.close()
