"""Optional reporting of a finished enrollment with a generic Alert 1226 (off by default)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.omadm import ALERT_TYPE
from lab.scepca.testing import LabScepCA
from lab.testing import LabServer
from tests.conftest import CliResult

DEVICE = "A1226000-0000-4000-8000-000000001226"


@pytest.mark.parametrize("enabled", [True, False])
def test_alert_1226_after_enrollment(run_cli: Callable[..., CliResult], tmp_path: Path,
                                     enabled: bool) -> None:
    with LabScepCA(tmp_path / "ca", challenge=None) as ca, LabServer(tmp_path / "lab") as lab:
        ca_pem = tmp_path / "ca.pem"
        ca_pem.write_bytes(ca.ca_cert.public_bytes(Encoding.PEM))
        lab.configure(scep_url=ca.url, scep_ca=str(ca_pem))
        assert lab.client is not None
        lab.client.assign("device-client-auth", device=DEVICE)
        env = {"DMAGENT_SERVER_URL": lab.url, "DMAGENT_SERVER_CA_BUNDLE": lab.ca_bundle,
               "DMAGENT_DEVICE_DEVICE_ID": DEVICE, "DMAGENT_TPM_TCTI": "",
               "DMAGENT_SYNC_ALERT_1226": "true" if enabled else "false"}
        assert run_cli("sync", "--once", env=env).returncode == 0
        uid = json.loads(run_cli("status", "--json", env=env).stdout)["scep_nodes"][0][
            "unique_id"]
        assert run_cli("tasks", "run", uid, env=env).returncode == 0

        def alerts_in_last_session() -> list[str]:
            assert lab.client is not None
            messages = lab.client.messages(DEVICE)
            last = messages[-1]["session_id"]
            return [m["body"] for m in messages if m["session_id"] == last
                    and m["direction"] == "in" and "<Data>1226</Data>" in (m["body"] or "")]

        assert run_cli("sync", "--once", env=env).returncode == 0
        sent = alerts_in_last_session()
        if not enabled:
            assert sent == []
            return
        assert len(sent) == 1
        body = sent[0]
        assert ALERT_TYPE in body and f"SCEP/{uid}/Install/Enroll" in body
        assert "<Format xmlns=\"syncml:metinf\">int</Format>" in body
        assert run_cli("sync", "--once", env=env).returncode == 0
        assert alerts_in_last_session() == []  # delivered once, then cleared
