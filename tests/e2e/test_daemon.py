"""`dmagent run` end to end with the real parts: the lab MDM over HTTPS, micromdm scepserver
with the lab's challenge validator, swtpm; device and user scope; results reported back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.testing import LabServer, MicromdmInstance, micromdm_with_validator
from tests.conftest import REPO, CliResult, SwtpmInstance
from tests.e2e.daemon_support import (
    DEVICE,
    UPN,
    agent_env,
    server_view,
    start_daemon,
    status,
    wait_for,
)

Cli = Callable[..., CliResult]


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


def server_thumbprints(lab: LabServer) -> dict[str, str]:
    return {scope: d["thumbprint"] or "" for scope, d in server_view(lab).items()}


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
