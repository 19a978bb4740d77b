"""`dmagent tasks|certinst|status|certs` through the CLI, against micromdm scepserver."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from tests.conftest import CliResult, ScepServerInstance, SwtpmInstance
from tests.integration.test_certinst import UID, make_ctx, provision

Cli = Callable[..., CliResult]


def test_task_run_status_and_certs(run_cli: Cli, state_dir: Path,
                                   scepserver: ScepServerInstance, tmp_path: Path) -> None:
    ctx = make_ctx(state_dir)
    provision(ctx, scepserver)
    ctx.close()
    env = {"DMAGENT_DEVICE_DEVICE_ID": "dev-1"}
    tasks = json.loads(run_cli("tasks", "list", "--json", env=env).stdout)
    assert [t["unique_id"] for t in tasks] == [UID]
    assert tasks[0]["action"] == (rf'dmagent certinst -s -k "Software\Microsoft\SCEP\MS DM '
                                  rf'Server\{UID}\Install" -h HKLM -t {UID}')
    before = json.loads(run_cli("status", "--json", env=env).stdout)
    # Provisioned directly (no Exec through the CSP): the node exists, no Status yet.
    assert [(n["unique_id"], n["status"]) for n in before["scep_nodes"]] == [(UID, None)]
    r = run_cli("tasks", "run", UID, "--json", env=env)
    assert r.returncode == 0, r.stderr
    outcome = json.loads(r.stdout)
    assert outcome["via"] == "direct" and outcome["status"] == 1
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    node = status["scep_nodes"][0]
    assert (node["status"], node["error_code"], node["thumbprint"]) == (
        1, "0x00000000", outcome["thumbprint"])
    assert node["expires"] and status["tasks"] == [] and not status["daemon"]["running"]
    text = run_cli("status", env=env).stdout
    assert "Status 1 (installed)" in text
    certs = json.loads(run_cli("certs", "list", "--store", "My", "--json", env=env).stdout)
    assert [c["thumbprint"] for c in certs] == [outcome["thumbprint"]]
    pem = tmp_path / "cert.pem"
    assert run_cli("certs", "export", outcome["thumbprint"], "--out", str(pem),
                   env=env).returncode == 0
    assert x509.load_pem_x509_certificate(pem.read_bytes()).subject.rfc4514_string().startswith(
        "CN=device-1")
    r = run_cli("certs", "export", outcome["thumbprint"], "--format", "pkcs12", "--out",
                str(tmp_path / "c.p12"), env=env)
    assert r.returncode == 1 and "not exportable" in r.stderr
    assert not (tmp_path / "c.p12").exists()
    r = run_cli("tasks", "run", UID, env=env)
    assert r.returncode == 5  # the task is gone after success


def test_certinst_cli_with_tpm_and_tss2_export(run_cli: Cli, state_dir: Path,
                                               scepserver: ScepServerInstance,
                                               swtpm: SwtpmInstance, tmp_path: Path) -> None:
    ctx = make_ctx(state_dir, swtpm.tcti)
    req = provision(ctx, scepserver, key_protection=2)
    ctx.close()
    env = {"DMAGENT_DEVICE_DEVICE_ID": "dev-1", "DMAGENT_TPM_TCTI": swtpm.tcti}
    r = run_cli("certinst", "-s", "-k", req.install_key, "-h", "HKLM", "-t", UID, "--json",
                env=env)
    assert r.returncode == 0, r.stderr
    thumb = json.loads(r.stdout)["thumbprint"]
    out = tmp_path / "dev"
    assert run_cli("certs", "export", thumb, "--format", "tss2", "--out", str(out),
                   env=env).returncode == 0
    assert out.with_suffix(".key").read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
    assert oct(out.with_suffix(".key").stat().st_mode & 0o777) == "0o600"
    r = run_cli("certs", "export", thumb, "--format", "pkcs12", "--out", str(tmp_path / "x"),
                env=env)
    assert r.returncode == 1 and "never leaves the TPM" in r.stderr


def test_certinst_cli_failure_exit_code(run_cli: Cli, state_dir: Path,
                                        scepserver: ScepServerInstance) -> None:
    ctx = make_ctx(state_dir)
    req = provision(ctx, scepserver, challenge="wrong", attempts=1)
    ctx.close()
    r = run_cli("certinst", "-k", req.install_key, "-h", "HKLM", "-t", UID,
                env={"DMAGENT_DEVICE_DEVICE_ID": "dev-1"})
    assert r.returncode == 1
    assert "failed (0x80070005)" in r.stdout
    assert "the Challenge and the task were deleted" in r.stdout
