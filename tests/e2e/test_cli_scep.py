"""`dmagent scep ...` as a user runs it: separate processes, a private state dir, real
micromdm scepserver (and swtpm for TPM keys) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.conftest import CliResult, ScepServerInstance, free_port

pytestmark = pytest.mark.scepserver
CHALLENGE_ENV = {"DMAGENT_SCEP_CHALLENGE": "secret"}
Run = Callable[..., CliResult]


def _json(result: CliResult) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_getcacaps(run_cli: Run, scepserver: ScepServerInstance) -> None:
    data = _json(run_cli("scep", "getcacaps", scepserver.url, "--json"))
    assert "POSTPKIOperation" in data["capabilities"]
    assert data["chosen"] == {"cipher": "aes128-cbc", "digest": "sha256", "method": "POST"}
    assert data["url"] == scepserver.url
    text = run_cli("scep", "getcacaps", scepserver.url, "--caps", "DES3,SHA-1")
    assert text.returncode == 0
    assert "Chosen: 3des-cbc, sha1, GET" in text.stdout


def test_getcacert_writes_pem_and_checks_thumbprint(run_cli: Run, scepserver: ScepServerInstance,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "ca.pem"
    data = _json(run_cli("scep", "getcacert", scepserver.url, "--out", str(out), "--json",
                         "--thumbprint", scepserver.ca_thumbprint.lower()))
    assert data["certificates"][0]["thumbprint"] == scepserver.ca_thumbprint
    assert set(data["certificates"][0]["roles"]) == {"ca", "encryption", "signing"}
    assert x509.load_pem_x509_certificate(out.read_bytes()).fingerprint is not None
    bad = run_cli("scep", "getcacert", scepserver.url, "--thumbprint", "00" * 20)
    assert bad.returncode == 1
    assert "Failed to Initialize SCEP enrollment with NDES Server" in bad.stderr
    assert f"server certs '{scepserver.ca_thumbprint}'" in bad.stderr


def test_enroll_json_and_renew(run_cli: Run, scepserver: ScepServerInstance,
                               tmp_path: Path) -> None:
    cert_file = tmp_path / "device.pem"
    data = _json(run_cli("scep", "enroll", scepserver.url, "--subject",
                         'CN=e2e-device, O="Contoso, Ltd"', "--san", "3+e2e.example",
                         "--ca-thumbprint", scepserver.ca_thumbprint, "--out-cert",
                         str(cert_file), "--json", env=CHALLENGE_ENV))
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert data["thumbprint"] == cert.fingerprint(hashes.SHA1()).hex().upper()
    assert data["serial"] == f"{cert.serial_number:x}"
    assert data["keystore"] == "software" and len(data["key_id"]) == 40
    assert data["algorithms"] == {"cipher": "aes128-cbc", "digest": "sha256", "method": "POST"}
    assert data["message_type"] == "PKCS_REQ" and data["respondent_url"] == scepserver.url
    assert {"keygen", "getcacaps", "getcacert", "pkioperation"} <= set(data["timings_ms"])
    assert "Contoso, Ltd" in data["subject"]
    renewed = _json(run_cli("scep", "renew", scepserver.url, "--cert", str(cert_file),
                            "--key-id", data["key_id"], "--json", env=CHALLENGE_ENV))
    assert renewed["message_type"] == "RENEWAL_REQ"
    assert renewed["key_id"] != data["key_id"]  # a new key by default
    assert renewed["subject"] == data["subject"]  # defaults to the old certificate's subject
    same = _json(run_cli("scep", "renew", scepserver.url, "--cert", str(cert_file),
                         "--key-id", data["key_id"], "--reuse-key", "--json",
                         env=CHALLENGE_ENV))
    assert same["key_id"] == data["key_id"]


def test_challenge_never_echoed(run_cli: Run, scepserver_factory: Callable[..., Any],
                                tmp_path: Path) -> None:
    secret = "Zq9-distinctive-challenge"
    server = scepserver_factory(challenge=secret)
    secret_file = tmp_path / "challenge.txt"
    secret_file.write_text(secret + "\n")
    ok = run_cli("-vv", "scep", "enroll", server.url, "--subject", "CN=quiet",
                 "--challenge-file", str(secret_file))
    assert ok.returncode == 0, ok.stderr
    assert "Certificate issued: CN=quiet" in ok.stdout
    wrong = run_cli("-vv", "scep", "enroll", server.url, "--subject", "CN=quiet",
                    "--challenge-file", "-", input="hunter2-wrong\n")
    assert wrong.returncode == 1
    assert "FAILURE, badRequest (2)" in wrong.stderr
    assert "0x80070005" in wrong.stderr  # -v prints the HRESULT
    for out in (ok.stdout, ok.stderr, wrong.stdout, wrong.stderr):
        assert "hunter2" not in out and "Zq9" not in out


@pytest.mark.parametrize("extra", [["--ca-thumbprint", "11" * 20], []],
                         ids=["wrong-thumbprint", "wrong-challenge"])
def test_failed_enrollment_leaves_no_key(run_cli: Run, scepserver: ScepServerInstance,
                                         state_dir: Path, extra: list[str]) -> None:
    """The key is generated while the CA is asked; a refusal at any point removes it."""
    wrong = run_cli("scep", "enroll", scepserver.url, "--subject", "CN=x", *extra,
                    env={"DMAGENT_SCEP_CHALLENGE": "secret" if extra else "wrong"})
    assert wrong.returncode == 1
    assert ("Failed to Initialize" if extra else "badRequest") in wrong.stderr
    keys = state_dir / "keys" / "software"
    assert not keys.exists() or not any(p.name.endswith(".key.pem") for p in keys.iterdir())


def test_out_key_is_encrypted_and_private(run_cli: Run, scepserver: ScepServerInstance,
                                          tmp_path: Path) -> None:
    key_file, pw_file = tmp_path / "k.pem", tmp_path / "pw"
    pw_file.write_text("export-pass\n")
    cert_file = tmp_path / "c.pem"
    res = run_cli("scep", "enroll", scepserver.url, "--subject", "CN=exported", "--out-key",
                  str(key_file), "--out-key-password-file", str(pw_file), "--out-cert",
                  str(cert_file), env=CHALLENGE_ENV)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), b"export-pass")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    missing = run_cli("scep", "enroll", scepserver.url, "--subject", "CN=x", "--out-key",
                      str(tmp_path / "k2.pem"), env=CHALLENGE_ENV)
    assert missing.returncode == 1 and "password" in missing.stderr


@pytest.mark.swtpm
def test_enroll_with_tpm_key(run_cli: Run, scepserver: ScepServerInstance, swtpm: Any) -> None:
    data = _json(run_cli("scep", "enroll", scepserver.url, "--subject", "CN=tpm-device",
                         "--keystore", "tpm", "--tcti", swtpm.tcti, "--get", "--json",
                         env=CHALLENGE_ENV))
    assert data["keystore"] == "tpm"
    assert data["algorithms"]["method"] == "GET"
    refused = run_cli("scep", "enroll", scepserver.url, "--subject", "CN=x", "--keystore",
                      "tpm", "--tcti", swtpm.tcti, "--out-key", "/tmp/never.pem",
                      env=CHALLENGE_ENV)
    assert refused.returncode == 1 and "never leaves the TPM" in refused.stderr
    too_big = run_cli("scep", "enroll", scepserver.url, "--subject", "CN=x", "--keystore",
                      "tpm", "--tcti", swtpm.tcti, "--key-length", "4096", env=CHALLENGE_ENV)
    assert too_big.returncode == 1, too_big.stderr  # swtpm refuses RSA-4096: a clean error
    assert "4096" in too_big.stderr and "internal error" not in too_big.stderr


def test_unreachable_exit_code(run_cli: Run) -> None:
    res = run_cli("-v", "scep", "enroll", f"http://127.0.0.1:{free_port()}/scep",
                  "--subject", "CN=x", env=CHALLENGE_ENV)
    assert res.returncode == 4
    assert "cannot connect" in res.stderr and "0x80072EFD" in res.stderr


def test_bad_profile_values_name_the_node(run_cli: Run, scepserver: ScepServerInstance,
                                          state_dir: Path) -> None:
    res = run_cli("scep", "enroll", scepserver.url, "--subject", "CN=ok, BOGUS=x",
                  env=CHALLENGE_ENV)
    assert res.returncode == 1
    assert "Install/SubjectName value 'CN=ok, BOGUS=x' is invalid" in res.stderr
    # the key was already being generated: it is dropped, never stored
    assert not (state_dir / "keys" / "software").exists()
    res = run_cli("scep", "enroll", scepserver.url, "--subject", "CN=ok", "--key-usage", "16",
                  env=CHALLENGE_ENV)
    assert res.returncode == 1 and "Install/KeyUsage" in res.stderr


def test_enroll_loads_no_event_loop_nor_httpx(scepserver: ScepServerInstance,
                                               state_dir: Path) -> None:
    """`dmagent scep enroll` talks on the blocking transport: asyncio and httpx cost more to
    import than its whole conversation with the CA."""
    import subprocess
    import sys

    from tests.conftest import REPO

    # nor the standard library's HTTP client (email, and ssl for a plain http URL), nor
    # logging at the default level: each costs milliseconds of every start
    heavy = ("asyncio", "httpx", "httpcore", "anyio", "http.client", "email", "ssl", "logging")
    code = ("import sys; from agent.cli import main; rc = main(sys.argv[1:]); "
            f"print(rc, sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "scep", "enroll", scepserver.url,
                           "--subject", "CN=lean", "--key-length", "1024", "--json"],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **CHALLENGE_ENV,
                               "DMAGENT_STATE_DIR": str(state_dir)}, check=False)
    assert proc.stderr.strip().splitlines()[-1] == "0 []", proc.stderr
    data = json.loads(proc.stdout)
    # the key started before the arguments were parsed is the one asked for
    cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    assert cert.public_key().key_size == 1024  # type: ignore[union-attr]


def test_no_proxy_from_the_environment(run_cli: Run, scepserver: ScepServerInstance) -> None:
    """Proxy variables are not applied, as before (httpx ignores them for the SCEP client's
    custom transport) and as WinHTTP's default (direct access)."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    data = _json(run_cli("scep", "getcacaps", scepserver.url, "--json",
                         env={"HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy}))
    assert "POSTPKIOperation" in data["capabilities"]
