"""Helpers for tests that run `dmagent run` as a real process against the lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.testing import LabServer
from tests.conftest import REPO

DEVICE = "0E7C2B6A-5D4F-4A3B-9C8D-7E6F5A4B3C2D"
UPN = "alice@lab.test"


def agent_env(state_dir: Path, lab: LabServer, tcti: str = "", device: str = DEVICE,
              **extra: str) -> dict[str, str]:
    env = {**os.environ, "DMAGENT_STATE_DIR": str(state_dir),
           "DMAGENT_SERVER_URL": lab.url, "DMAGENT_SERVER_CA_BUNDLE": lab.ca_bundle,
           "DMAGENT_DEVICE_DEVICE_ID": device, "DMAGENT_DEVICE_NAME": "dev-e2e",
           "DMAGENT_DEVICE_USER_UPN": UPN, "DMAGENT_TPM_TCTI": tcti,
           # The real schedule shape (3 attempts, 1 minute apart) with a shorter minute.
           "DMAGENT_TASKS_INTERVAL_SECONDS": "1", "DMAGENT_TASKS_MINUTE_SECONDS": "0.2",
           "DMAGENT_SYNC_POLL_MINUTE_SECONDS": "0.5"}
    env.update(extra)
    return env


def start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "-v", "run"], env=env,
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)


def cli_json(env: dict[str, str], *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "agent.cli", *args, "--json"], env=env,
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def status(env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = cli_json(env, "status")
    return result


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def server_view(lab: LabServer, device: str = DEVICE) -> dict[str, dict[str, Any]]:
    """The lab's deliveries for the device, by scope."""
    assert lab.client is not None
    return {d["scope"]: d for d in lab.client.device(device)["deliveries"]}
