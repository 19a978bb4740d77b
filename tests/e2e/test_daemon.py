"""`dmagent run` end to end with the real parts: the lab MDM over HTTPS, micromdm scepserver
with the lab's challenge validator, swtpm; device and user scope; results reported back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.testing import LabServer, MicromdmInstance, micromdm_with_validator
from tests.conftest import REPO, CliResult, SwtpmInstance

Cli = Callable[..., CliResult]
DEVICE = "0E7C2B6A-5D4F-4A3B-9C8D-7E6F5A4B3C2D"
UPN = "alice@lab.test"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[LabServer, MicromdmInstance]]:
    with LabServer(tmp_path / "lab") as server:
        scep = micromdm_with_validator(server.lab.path, tmp_path / "micromdm")
        try:
            assert server.client is not None
            server.client.set_device(DEVICE, upn=UPN, name="dev-e2e")
            server.client.assign("device-client-auth", device=DEVICE)
            server.client.assign("user-email", device=DEVICE)
            yield server, scep
        finally:
            scep.stop()


def agent_env(state_dir: Path, lab: LabServer, tcti: str = "") -> dict[str, str]:
    return {**os.environ, "DMAGENT_STATE_DIR": str(state_dir),
            "DMAGENT_SERVER_URL": lab.url, "DMAGENT_SERVER_CA_BUNDLE": lab.ca_bundle,
            "DMAGENT_DEVICE_DEVICE_ID": DEVICE, "DMAGENT_DEVICE_NAME": "dev-e2e",
            "DMAGENT_DEVICE_USER_UPN": UPN, "DMAGENT_TPM_TCTI": tcti,
            "DMAGENT_TASKS_INTERVAL_SECONDS": "1", "DMAGENT_TASKS_MINUTE_SECONDS": "0.2",
            "DMAGENT_SYNC_POLL_MINUTE_SECONDS": "0.5"}


def start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "-v", "run"], env=env,
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)


def status(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--json"], env=env,
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def server_thumbprints(lab: LabServer) -> dict[str, str]:
    assert lab.client is not None
    dev = lab.client.device(DEVICE)
    return {d["scope"]: d["thumbprint"] or "" for d in dev["deliveries"]}


@pytest.mark.slow
def test_daemon_enrolls_device_tpm_and_user_software_and_reports(
        tmp_path: Path, lab: tuple[LabServer, MicromdmInstance], swtpm: SwtpmInstance) -> None:
    server, _scep = lab
    state = tmp_path / "state"
    env = agent_env(state, server, swtpm.tcti)
    log = tmp_path / "daemon.log"
    proc = start_daemon(env, log)
    try:
        def both_installed() -> bool:
            nodes = status(env)["scep_nodes"]
            return len(nodes) == 2 and all(n["status"] == 1 for n in nodes)

        wait_for(both_installed, 60, "both certificates installed", log)
        info = status(env)
        assert info["daemon"]["running"] and info["tasks"] == []
        by_scope = {n["scope"]: n for n in info["scep_nodes"]}
        # The thumbprints reach the server at the sync that follows the enrollment.
        wait_for(lambda: server_thumbprints(server) == {
            s: by_scope[s]["thumbprint"] for s in ("device", "user")}, 30,
            "the server to learn both thumbprints", log)
        certs = json.loads(subprocess.run(
            [sys.executable, "-m", "agent.cli", "certs", "list", "--store", "My", "--json"],
            env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout)
        kinds = {c["scope"]: c["key_store"] for c in certs}
        assert kinds == {"device": "tpm", "user": "software"}
        # The challenges are gone from the Install nodes.
        reg = subprocess.run([sys.executable, "-m", "agent.cli", "reg", "query",
                              r"HKLM\Software\Microsoft\SCEP", "/s"], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        assert "Challenge" not in reg and "ServerURL" in reg
        # `dmagent sync` reaches the running daemon.
        r = subprocess.run([sys.executable, "-m", "agent.cli", "sync", "--json"], env=env,
                           cwd=REPO, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
    assert not (state / "dmagent.sock").exists()


def test_second_daemon_on_the_same_state_dir_is_refused(
        tmp_path: Path, lab: tuple[LabServer, MicromdmInstance]) -> None:
    server, _ = lab
    env = agent_env(tmp_path / "state", server)
    env["DMAGENT_SYNC_ON_START"] = "false"
    log = tmp_path / "d.log"
    first = start_daemon(env, log)
    try:
        wait_for(lambda: status(env)["daemon"]["running"], 15, "the daemon", log)
        second = subprocess.run([sys.executable, "-m", "agent.cli", "run"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 6
        assert "another dmagent daemon" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(20)
