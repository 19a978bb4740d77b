"""`python -m lab.scepca` as an operator runs it: init, serve (a separate process), list,
approve from another process while the agent polls, faults at run time, revoke, info."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.csr import CsrRequest
from agent.diagnostics import HResult
from agent.errors import DmAgentError
from agent.scep.enroll import EnrollOptions, enroll
from tests.conftest import REPO
from tests.scep_support import CryptoKeyHandle


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab.scepca", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, check=False)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, dict[str, object]]]:
    """`serve` in its own process: NDES mode, manual approval, a fault from the command line."""
    directory = tmp_path / "ca"
    assert cli("init", "--dir", str(directory)).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.scepca", "serve", "--dir", str(directory), "--port", "0",
         "--mode", "ndes", "--pending", "manual", "--fault", "503@GetCACaps:count=1",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "LAB_SCEPCA_CHALLENGE": "cli-secret"})
    info_path = directory / "server.json"
    deadline = time.monotonic() + 15
    while not info_path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.05)
    yield directory, json.loads(info_path.read_text())
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    assert not info_path.exists()  # removed on a clean stop


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    first = cli("init", "--dir", str(tmp_path / "ca"))
    assert first.returncode == 0 and "thumbprint" in first.stdout
    again = cli("init", "--dir", str(tmp_path / "ca"))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert cli("list", "--dir", str(tmp_path / "nowhere")).returncode == 1


@pytest.mark.slow
def test_serve_approve_poll_from_another_process(served: tuple[Path, dict[str, object]]
                                                 ) -> None:
    directory, info = served
    url = str(info["url"])
    assert info["mode"] == "ndes" and url.endswith("/certsrv/mscep/mscep.dll")
    thumbprint = json.loads(cli("info", "--dir", str(directory)).stdout)["thumbprint"]
    key = CryptoKeyHandle.rsa()
    options = EnrollOptions(url, CsrRequest(subject="CN=cli-device", challenge="cli-secret"),
                            ca_thumbprint=thumbprint, retry_delay_minutes=1, retry_count=3)

    # The fault given on the command line: the first GetCACaps is a 503.
    with pytest.raises(DmAgentError) as err:
        asyncio.run(enroll(options, key))
    assert err.value.hresult == HResult.HTTP_E_STATUS_SERVICE_UNAVAIL

    async def operator(seconds: float) -> None:
        pending = json.loads(cli("list", "--dir", str(directory), "--status", "pending",
                                 "--json").stdout)
        for row in pending:
            done = await asyncio.to_thread(cli, "approve", "--dir", str(directory),
                                           row["transaction_id"])
            assert done.returncode == 0 and "approved" in done.stdout

    result = asyncio.run(enroll(options, key, sleep=operator, minute_seconds=0.001))
    assert result.polls == 1
    listing = cli("list", "--dir", str(directory)).stdout
    assert result.transaction_id in listing and "issued" in listing
    decisions = cli("list", "--dir", str(directory), "--decisions").stdout
    assert "static" in decisions and "cli" in decisions
    crs = list((directory / "CertificateRequestStatus" / "Succeed").glob("*.CRS"))
    assert [p.stem for p in crs] == [result.transaction_id.upper()]

    # Faults at run time through the control endpoint.
    added = cli("faults", "--dir", str(directory), "--add", "500@GetCACert")
    assert added.returncode == 0 and "500@GetCACert" in added.stdout
    with pytest.raises(DmAgentError) as err:
        asyncio.run(enroll(options, CryptoKeyHandle.rsa()))
    assert err.value.hresult == HResult.HTTP_E_STATUS_SERVER_ERROR
    assert cli("faults", "--dir", str(directory), "--clear").stdout.strip() == ""
    bad = cli("faults", "--dir", str(directory), "--add", "nonsense")
    assert bad.returncode == 1 and "unknown fault kind" in bad.stderr

    serial = f"{result.certificate.serial_number:X}"
    assert cli("revoke", "--dir", str(directory), serial).returncode == 0
    revoked = json.loads(cli("list", "--dir", str(directory), "--status", "revoked",
                             "--json").stdout)
    assert [r["transaction_id"] for r in revoked] == [result.transaction_id]
    assert cli("approve", "--dir", str(directory), "unknown-tx").returncode == 1


def test_faults_without_a_server(tmp_path: Path) -> None:
    assert cli("init", "--dir", str(tmp_path / "ca")).returncode == 0
    out = cli("faults", "--dir", str(tmp_path / "ca"), "--add", "503")
    assert out.returncode == 1 and "no running server" in out.stderr
