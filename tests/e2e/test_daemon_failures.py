"""Failure paths with the real schedule shape (3 attempts, 1 minute apart, the minute shortened
by config): the lab MDM delivers a device profile pointing at the lab SCEP CA, whose faults
make every attempt fail — or only the first two."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.diagnostics import HResult, to_signed
from lab.scepca.testing import LabScepCA
from lab.testing import LabServer
from tests.e2e.daemon_support import (
    DEVICE,
    agent_env,
    cli_json,
    server_view,
    start_daemon,
    status,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def lab_and_ca(tmp_path: Path) -> Iterator[tuple[LabServer, LabScepCA]]:
    with LabScepCA(tmp_path / "ca", challenge=None) as ca, \
            LabServer(tmp_path / "lab") as lab:
        ca_pem = tmp_path / "ca.pem"
        from cryptography.hazmat.primitives.serialization import Encoding

        ca_pem.write_bytes(ca.ca_cert.public_bytes(Encoding.PEM))
        # A failed profile is not re-sent at once, so the reported failure stays visible.
        lab.configure(scep_url=ca.url, scep_ca=str(ca_pem),
                      delivery={"retry_failed": False})
        assert lab.client is not None
        lab.client.assign("device-client-auth", device=DEVICE)
        yield lab, ca


@pytest.mark.parametrize(("fault", "hresult"), [
    ("404@PKIOperation", HResult.HTTP_E_STATUS_NOT_FOUND),
    ("503", HResult.HTTP_E_STATUS_SERVICE_UNAVAIL),
    ("timeout@GetCACert", HResult.WINHTTP_TIMEOUT),
])
def test_server_down_three_attempts_then_status_16(
        tmp_path: Path, lab_and_ca: tuple[LabServer, LabScepCA], fault: str,
        hresult: HResult) -> None:
    lab, ca = lab_and_ca
    ca.add_fault(fault)
    env = agent_env(tmp_path / "state", lab, DMAGENT_SCEP_TIMEOUT="1")
    log = tmp_path / "daemon.log"
    proc = start_daemon(env, log)
    try:
        def failed() -> bool:
            nodes = status(env)["scep_nodes"]
            return bool(nodes) and nodes[0]["status"] == 16 and not status(env)["tasks"]

        wait_for(failed, 60, "the last attempt to fail", log)
        node = status(env)["scep_nodes"][0]
        assert node["error_code"] == f"0x{int(hresult):08X}"
        events = cli_json(env, "events")
        assert [e["id"] for e in events].count(32) == 3  # one enroll-failed event per attempt
        attempts = [e["data"]["retry_count"] for e in events if e["id"] == 309]
        assert attempts == [1, 2, 3]
        reg = cli_json(env, "reg", "query", r"HKLM\Software\Microsoft\SCEP", "/s")
        names = {v["name"] for block in reg for v in block["values"] or []}
        assert "Challenge" not in names and "ServerURL" in names
        # The next session reports the failure to the server (signed ErrorCode, Status 16).
        wait_for(lambda: server_view(lab)["device"]["status"] == 16, 30,
                 "the failure to reach the server", log)
        assert server_view(lab)["device"]["error_code"] == to_signed(hresult)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_server_back_before_the_third_attempt_succeeds(
        tmp_path: Path, lab_and_ca: tuple[LabServer, LabScepCA]) -> None:
    lab, ca = lab_and_ca
    ca.add_fault("503@GetCACaps:count=2")  # attempts 1 and 2 fail, attempt 3 gets through
    env = agent_env(tmp_path / "state", lab)
    log = tmp_path / "daemon.log"
    proc = start_daemon(env, log)
    try:
        wait_for(lambda: [n["status"] for n in status(env)["scep_nodes"]] == [1], 60,
                 "the third attempt to succeed", log)
        events = cli_json(env, "events")
        assert [e["id"] for e in events if e["id"] in (32, 39)] == [32, 32, 39]
        thumb = status(env)["scep_nodes"][0]["thumbprint"]
        wait_for(lambda: server_view(lab)["device"]["thumbprint"] == thumb, 30,
                 "the thumbprint to reach the server", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
