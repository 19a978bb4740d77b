"""`dmagent lab …` as a user runs it: init, the local and HTTP control paths, enqueue, the
generated csrverifier wrapper's exit codes, `lab serve` in the foreground."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from lab.issue import issue_challenge
from lab.labdir import LabDir
from lab.profiles import Var, expand_profile, find_profile
from lab.state import LabState
from lab.testing import ScriptedTree, build_csr, run_session
from tests.conftest import REPO, CliResult

Cli = Callable[..., CliResult]


def _init(run_cli: Cli, d: Path) -> dict[str, str]:
    r = run_cli("lab", "init", "--dir", str(d), "--json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_init_creates_a_private_lab(run_cli: Cli, tmp_path: Path) -> None:
    d = tmp_path / "lab"
    info = _init(run_cli, d)
    assert Path(info["ca_bundle"]).is_file() and Path(info["csr_verifier"]).is_file()
    for secret in ("control.token", "tls/server.key", "challenge/signer.key",
                   "challenge/encrypt.key", "lab.toml"):
        assert (d / secret).stat().st_mode & 0o077 == 0, secret
    assert sorted(p.name for p in (d / "profiles").glob("*.toml")) == [
        "device-client-auth.toml", "user-email.toml"]
    again = run_cli("lab", "init", "--dir", str(d))
    assert again.returncode == 3 and "already a lab directory" in again.stderr
    missing = run_cli("lab", "devices", "--dir", str(tmp_path / "nope"))
    assert missing.returncode == 3 and "lab init" in missing.stderr


def test_local_control_commands(run_cli: Cli, tmp_path: Path) -> None:
    d = str(tmp_path / "lab")
    _init(run_cli, Path(d))
    r = run_cli("lab", "assign", "device-client-auth", "--device", "dev1", "--dir", d)
    assert r.returncode == 0 and "assigned to device dev1" in r.stdout
    r = run_cli("lab", "set-device", "dev1", "--name", "pc1", "--groups", "a,b", "--dir", d)
    assert r.returncode == 0, r.stderr
    shown = json.loads(run_cli("lab", "show", "dev1", "--json", "--dir", d).stdout)
    assert shown["name"] == "pc1" and shown["groups"] == ["a", "b"]
    assert shown["assigned"] == ["286033f4-0515-414d-b58f-08e74f6e8e3c"]
    xml = tmp_path / "cmd.xml"
    xml.write_text("<Get><CmdID>1</CmdID><Item><Target><LocURI>./DevDetail/SwV</LocURI>"
                   "</Target></Item></Get>")
    r = run_cli("lab", "enqueue", "dev1", str(xml), "--json", "--dir", d)
    ids = json.loads(r.stdout)["ids"]
    cmd = json.loads(run_cli("lab", "command", str(ids[0]), "--json", "--dir", d).stdout)
    assert cmd["state"] == "queued" and "./DevDetail/SwV" in cmd["xml"]
    xml.write_text("<Frobnicate/>")
    r = run_cli("lab", "enqueue", "dev1", str(xml), "--dir", d)
    assert r.returncode == 1 and "unknown SyncML command" in r.stderr
    r = run_cli("lab", "show", "nobody", "--dir", d)
    assert r.returncode == 5 and "no device" in r.stderr
    r = run_cli("lab", "assign", "nope", "--group", "g", "--dir", d)
    assert r.returncode == 5 and "no profile" in r.stderr


def test_csrverifier_wrapper_exit_codes(run_cli: Cli, tmp_path: Path) -> None:
    d = tmp_path / "lab"
    info = _init(run_cli, d)
    lab = LabDir(d)
    with LabState(lab.db_path) as state:
        profile = find_profile(lab.profiles(), "device-client-auth")
        assert profile is not None
        state.assign(profile.id, "device", "dev1")
        e = expand_profile(profile, lab.config().account_id,
                           {Var.DEVICE_NAME: "pc1", Var.AAD_DEVICE_ID: "dev1"})
        token, _ = issue_challenge(lab, state, e, "dev1", datetime.now(UTC))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = build_csr(key, subject=e.subject_pairs, sans=[(int(t), v) for t, v in e.sans],
                    ekus=profile.ekus, key_usage=profile.key_usage, challenge=token)

    def verifier(data: bytes) -> subprocess.CompletedProcess[bytes]:
        # as micromdm runs it: no arguments, DER on stdin, only the exit code matters
        return subprocess.run([info["csr_verifier"]], input=data, capture_output=True,
                              timeout=60, check=False, env={"PATH": os.environ["PATH"]})

    first = verifier(csr)
    assert first.returncode == 0, first.stderr
    second = verifier(csr)
    assert second.returncode == 1 and b"reused" in second.stderr
    assert verifier(b"junk").returncode == 1
    rows = json.loads(run_cli("lab", "crs", "--json", "--dir", str(d)).stdout)
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("verified", None), ("refused", "reused"), ("refused", "bad-csr")]
    text = run_cli("lab", "crs", "--dir", str(d)).stdout
    assert "reused 0x800700B7" in text


def test_serve_in_the_foreground(run_cli: Cli, tmp_path: Path) -> None:
    d = tmp_path / "lab"
    _init(run_cli, d)
    lab = LabDir(d)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "lab", "serve", "--dir", str(d),
                             "--scep-url", "http://127.0.0.1:9/scep"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while lab.server_info() is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "lab serve did not start"
            time.sleep(0.05)
        info = lab.server_info()
        assert info is not None and info["pid"] == proc.pid
        event, _ = run_session(info["mdm_url"], str(lab.ca_cert_path), "dev-cli",
                               ScriptedTree())
        assert event is not None and event.summary.outcome == "completed"
        status = json.loads(run_cli("lab", "status", "--json", "--dir", str(d)).stdout)
        assert status["server"]["pid"] == proc.pid  # the CLI talks to the running server
        assert status["scep_url"] == "http://127.0.0.1:9/scep"
        devices = json.loads(run_cli("lab", "devices", "--json", "--dir", str(d)).stdout)
        assert [(x["device_id"], x["sessions"]) for x in devices] == [("dev-cli", 1)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "lab MDM server  https://127.0.0.1:" in out
    assert lab.server_info() is None  # removed on the way out


def test_concurrent_presentations_of_one_challenge_issue_once(run_cli: Cli,
                                                              tmp_path: Path) -> None:
    """Validator processes racing on the same challenge (scepserver spawns one per CSR):
    the conditional UPDATE lets exactly one through."""
    d = tmp_path / "lab"
    info = _init(run_cli, d)
    lab = LabDir(d)
    with LabState(lab.db_path) as state:
        profile = find_profile(lab.profiles(), "device-client-auth")
        assert profile is not None
        state.assign(profile.id, "device", "dev1")
        e = expand_profile(profile, lab.config().account_id,
                           {Var.DEVICE_NAME: "pc1", Var.AAD_DEVICE_ID: "dev1"})
        token, _ = issue_challenge(lab, state, e, "dev1", datetime.now(UTC))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = build_csr(key, subject=e.subject_pairs, sans=[(int(t), v) for t, v in e.sans],
                    ekus=profile.ekus, key_usage=profile.key_usage, challenge=token)
    procs = [subprocess.Popen([info["csr_verifier"]], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(6)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(csr)
        p.stdin.close()
    codes = sorted(p.wait(60) for p in procs)
    assert codes == [0, 1, 1, 1, 1, 1]
    with LabState(lab.db_path) as state:
        rows = state.crs("dev1")
    assert sorted(r["status"] for r in rows) == ["refused"] * 5 + ["verified"]
    assert {r["reason"] for r in rows if r["status"] == "refused"} == {"reused"}
