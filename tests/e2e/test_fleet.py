"""`dmagent fleet`: many devices in one process against the lab MDM and the lab SCEP CA."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from lab.scepca.testing import LabScepCA
from lab.testing import LabServer
from tests.conftest import CliResult

pytestmark = pytest.mark.slow
DEVICES = 20


def test_fleet_enrolls_every_device(run_cli: Callable[..., CliResult], tmp_path: Path) -> None:
    with LabScepCA(tmp_path / "ca", challenge=None) as ca, LabServer(tmp_path / "lab") as lab:
        ca_pem = tmp_path / "ca.pem"
        ca_pem.write_bytes(ca.ca_cert.public_bytes(Encoding.PEM))
        lab.configure(scep_url=ca.url, scep_ca=str(ca_pem))
        assert lab.client is not None
        lab.client.assign("device-client-auth", group="*")
        r = run_cli("fleet", "--devices", str(DEVICES), "--root", str(tmp_path / "fleet"),
                    "--server", lab.url, "--until-done", "--timeout", "120", "--json",
                    env={"DMAGENT_SERVER_CA_BUNDLE": lab.ca_bundle, "DMAGENT_TPM_TCTI": ""},
                    timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout)
        assert summary["done"] == DEVICES and summary["enrollments"] == DEVICES
        # Every device is its own device: own state dir, own DeviceID, own certificate,
        # and the lab saw each one report its thumbprint.
        devices = lab.client.devices()
        assert len({d["device_id"] for d in devices}) == DEVICES
        issued = [r for r in ca.requests() if r.status == "issued"]
        assert len(issued) == DEVICES
        dirs = sorted(p.name for p in (tmp_path / "fleet").iterdir())
        assert dirs == [f"fleet-{i:05d}" for i in range(1, DEVICES + 1)]
