"""Reporting back through NodeCache, as Intune does it: the lab caches each installed node's
CertThumbprint on the device and then only asks for ChangedNodes; the agent's NodeCache CSP
must say when the thumbprint changed (here: the certificate was deleted)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from lab.scepca.testing import LabScepCA
from lab.testing import LabServer
from tests.conftest import CliResult

DEVICE = "CACE0000-0000-4000-8000-00000000CACE"


def test_changed_nodes_report_a_deleted_certificate(run_cli: Callable[..., CliResult],
                                                    tmp_path: Path) -> None:
    with LabScepCA(tmp_path / "ca", challenge=None) as ca, LabServer(tmp_path / "lab") as lab:
        ca_pem = tmp_path / "ca.pem"
        ca_pem.write_bytes(ca.ca_cert.public_bytes(Encoding.PEM))
        lab.configure(scep_url=ca.url, scep_ca=str(ca_pem), delivery={"nodecache": True})
        assert lab.client is not None
        lab.client.assign("device-client-auth", device=DEVICE)
        env = {"DMAGENT_SERVER_URL": lab.url, "DMAGENT_SERVER_CA_BUNDLE": lab.ca_bundle,
               "DMAGENT_DEVICE_DEVICE_ID": DEVICE, "DMAGENT_TPM_TCTI": ""}

        def cli(*args: str) -> CliResult:
            r = run_cli(*args, env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            return r

        def node() -> dict[str, object]:
            result: dict[str, object] = json.loads(cli("status", "--json").stdout)[
                "scep_nodes"][0]
            return result

        def delivery() -> dict[str, object]:
            assert lab.client is not None
            (d,) = lab.client.device(DEVICE)["deliveries"]
            result: dict[str, object] = d
            return result

        cli("sync", "--once")
        cli("tasks", "run", str(node()["unique_id"]))
        first = node()["thumbprint"]
        cli("sync", "--once")  # follow-up: the lab learns the thumbprint, sets NodeCache up
        cli("sync", "--once")  # the NodeCache node is in place with ExpectedValue = thumbprint
        assert delivery()["thumbprint"] == first
        assert delivery()["nodecache_expected"] == first
        tree = json.loads(cli("tree", "get", "./Vendor/MSFT/NodeCache/MS DM Server/ChangedNodes",
                              "--json").stdout)
        assert not tree.get("data")  # nothing changed on the device
        # The user deletes the certificate: ChangedNodes now lists the cached node, the lab
        # re-sends the profile with a new challenge, the device enrolls again.
        cli("reg", "delete", rf"HKLM\SOFTWARE\Microsoft\SystemCertificates\MY\Certificates\{first}",
            "/f")
        tree = json.loads(cli("tree", "get", "./Vendor/MSFT/NodeCache/MS DM Server/ChangedNodes",
                              "--json").stdout)
        assert tree.get("data") == delivery()["nodecache_id"]
        cli("sync", "--once")
        cli("tasks", "run", str(node()["unique_id"]))
        second = node()["thumbprint"]
        assert second and second != first
        cli("sync", "--once")
        assert delivery()["thumbprint"] == second
