"""Crash safety: SIGKILL the daemon at random moments across sync and enrollment, restart it,
and check after every kill that nothing is lost or doubled; at the end every enrollment has
finished exactly once and no key is left without its certificate.

25 devices x 2 kills = 50 trials (the issue asks for at least 50). Each kill is aimed at a
phase, picked at random, by watching the daemon's log: during a sync (after "sync
requested"), between a key's creation and its certificate (after "created ... key"), between
an installation and the reporting sync (after event 39), or at a plain random time; then a
small random delay. Aiming by progress rather than by the clock keeps the kills mid-work on
a loaded CI machine as on an idle one.
Each device gets a device profile (TPM key on swtpm) and a user profile (software key) from
the lab MDM; the lab SCEP CA issues (no challenge check: a challenge consumed by an attempt
killed after the CA answered would otherwise refuse the retry, which is the CA's policy, not
the agent's crash safety).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.certinst import PENDING_KEY_ID
from agent.certstore import CertStore, Scope, StoreName
from agent.config import load_config
from agent.device import DeviceContext
from agent.taskstore import TaskStore
from lab.scepca.testing import LabScepCA
from lab.testing import LabServer
from tests.conftest import SwtpmInstance
from tests.e2e.daemon_support import (
    UPN,
    agent_env,
    server_view,
    start_daemon,
    status,
    wait_for,
)

pytestmark = pytest.mark.slow

DEVICES = 25
PHASES = (("sync requested", 0.25), ("created", 0.15), ("event 39", 0.1), ("", 2.0))
SCEP_ROOTS = {Scope.DEVICE: r"HKLM\Software\Microsoft\SCEP",
              Scope.USER: r"HKCU\Software\Microsoft\SCEP"}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabServer]:
    with LabScepCA(tmp_path / "ca", challenge=None) as ca, LabServer(tmp_path / "lab") as lab:
        ca_pem = tmp_path / "ca.pem"
        ca_pem.write_bytes(ca.ca_cert.public_bytes(Encoding.PEM))
        lab.configure(scep_url=ca.url, scep_ca=str(ca_pem))
        assert lab.client is not None
        lab.client.assign("device-client-auth", group="*")
        lab.client.assign("user-email", group="*")
        yield lab


def open_device(env: dict[str, str]) -> DeviceContext:
    keys = ("DMAGENT_STATE_DIR", "DMAGENT_DEVICE_DEVICE_ID", "DMAGENT_TPM_TCTI")
    return DeviceContext(load_config(None, env={k: env[k] for k in keys}))


def check_invariants(env: dict[str, str], *, final: bool) -> dict[str, Any]:
    """Inspect a stopped device's state. Returns {scope: thumbprint} of finished nodes."""
    ctx = open_device(env)
    try:
        reg = ctx.registry
        assert reg.integrity_check() == "ok"
        certs = CertStore(reg)
        tasks = TaskStore(reg)
        finished: dict[str, str] = {}
        unfinished_labels: set[str] = set()
        recorded_keys: set[str] = set()
        for scope, root in SCEP_ROOTS.items():
            if not reg.key_exists(root):
                continue
            for provider in reg.subkeys(root):
                for uid in reg.subkeys(f"{root}\\{provider}"):
                    node = f"{root}\\{provider}\\{uid}"
                    assert reg.key_exists(node + r"\Install"), f"{uid}: Install node lost"
                    mine = certs.by_unique_id(scope, uid)
                    assert len(mine) <= 1, f"{uid}: {len(mine)} certificates"
                    status = reg.query(node, "Status")
                    if status == 1:
                        assert [c.thumbprint for c in mine] == [reg.query(node, "CertThumbprint")]
                        ctx.keystore(mine[0].key_store).load(mine[0].key_id)  # key present
                        finished[scope.value] = mine[0].thumbprint
                    else:
                        # Not finished: its task must still be there to finish it.
                        assert status != 16, f"{uid}: failed ({reg.query(node, 'ErrorCode')})"
                        assert tasks.find_by_unique_id(uid), f"{uid}: task lost (Status {status})"
                        unfinished_labels.add(uid.casefold())
                    pending = reg.query(node, PENDING_KEY_ID)
                    if isinstance(pending, str):
                        recorded_keys.add(pending)
        linked = {c.key_id for s in Scope for c in certs.list_store(s, StoreName.MY)}
        for kind in ("software", "tpm"):
            store = ctx.keystore(kind)
            for key_id in store.list_ids():
                if key_id in linked or key_id in recorded_keys:
                    continue
                label = store.load(key_id).spec.label.casefold()
                # A key made by a killed attempt, not yet recorded: the next attempt sweeps it.
                assert not final and label in unfinished_labels, \
                    f"orphan {kind} key {key_id} (label {label!r})"
        if final:
            assert recorded_keys == set(), "pending key records left after finishing"
            assert tasks.list() == []
        return finished
    finally:
        ctx.close()


def wait_for_marker(log: Path, offset: int, marker: str,
                    timeout: float = 3.0) -> None:
    """Until `marker` appears in the log written after `offset`; a phase that does not come
    (this device is past it) costs at most `timeout`, then the kill lands anyway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            with log.open("rb") as fh:
                fh.seek(offset)
                if marker.encode() in fh.read():
                    return
        time.sleep(0.01)


def reported(lab: LabServer, device: str) -> bool:
    view = server_view(lab, device)
    return len(view) == 2 and all(d["status"] == 1 and d["thumbprint"] for d in view.values())


def test_sigkill_at_random_moments(tmp_path: Path, lab: LabServer,
                                   swtpm: SwtpmInstance) -> None:
    rng = random.Random(int(os.environ.get("DMAGENT_CRASH_SEED", "20261122")))
    trials = 0
    killed_unfinished = 0
    for n in range(DEVICES):
        device = f"C0FFEE00-0000-4000-8000-{n:012d}"
        assert lab.client is not None
        lab.client.set_device(device, upn=UPN, name=f"crash-{n}")
        env = agent_env(tmp_path / f"dev{n}", lab, swtpm.tcti, device=device,
                        DMAGENT_DEVICE_NAME=f"crash-{n}")
        log = tmp_path / f"dev{n}.log"
        for _ in range(2):
            marker, spread = rng.choice(PHASES)
            offset = log.stat().st_size if log.exists() else 0
            proc = start_daemon(env, log)
            if marker:
                wait_for_marker(log, offset, marker)
            time.sleep(rng.uniform(0.0, spread))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            finished = check_invariants(env, final=False)
            killed_unfinished += len(finished) < 2
            trials += 1
        proc = start_daemon(env, log)
        try:
            wait_for(lambda dev=device: reported(lab, dev), 90,
                     f"device {n} to finish and report", log)
            wait_for(lambda e=env: bool(status(e)["daemon"]["running"]), 20,
                     "the daemon to be up", log)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finished = check_invariants(env, final=True)
        view = server_view(lab, device)
        assert finished == {scope: d["thumbprint"] for scope, d in view.items()}
    print(f"\ncrash trials: {trials} kills, {killed_unfinished} of them before both "
          f"enrollments had finished; all {DEVICES} devices converged")
    assert trials >= 50
    assert killed_unfinished >= trials // 4  # the kills really landed mid-sync/-enrollment
