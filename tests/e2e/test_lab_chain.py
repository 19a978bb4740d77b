"""The whole chain as users run it: the lab MDM (Intune-style profiles and dynamic challenges)
→ the agent (`dmagent sync --once`, `dmagent tasks run`) → a SCEP CA that asks the lab to
validate each CSR: micromdm scepserver with `-csrverifierexec`, or the lab CA in NDES mode.

Bad challenges (tampered, expired, reused, mismatched) are refused by the validator, answered
FAILURE/badRequest by the CA and reported by the agent as Status 16 / E_ACCESSDENIED; renewal
happens when the lab (not the device) decides it is due; a deleted certificate gets a new one.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.certstore import CertStore, Scope, StoreName
from agent.config import load_config
from agent.csp.scep_values import CHALLENGE, challenge_purpose
from agent.device import DeviceContext
from agent.diagnostics import HResult, to_signed
from agent.registry import RegType
from lab.testing import LabServer, micromdm_with_validator
from tests.conftest import CliResult

pytestmark = pytest.mark.slow

Cli = Callable[..., CliResult]
SCEP_ROOT = r"HKLM\Software\Microsoft\SCEP\MS DM Server"
DENIED = f"0x{int(HResult.E_ACCESSDENIED):08X}"


class ShiftableClock:
    """The lab's clock: real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Chain:
    lab: LabServer
    clock: ShiftableClock
    kind: str


@dataclass
class Device:
    """One emulated device driven through the CLI, with its own state dir."""

    device_id: str
    env: dict[str, str]
    run_cli: Cli
    lab: LabServer

    def cli(self, *args: str) -> CliResult:
        return self.run_cli(*args, env=self.env)

    def sync(self) -> None:
        r = self.cli("sync", "--once")
        assert r.returncode == 0, r.stderr

    def node(self) -> dict[str, Any]:
        import json

        nodes = json.loads(self.cli("status", "--json").stdout)["scep_nodes"]
        assert len(nodes) == 1, nodes
        node: dict[str, Any] = nodes[0]
        return node

    def enroll(self) -> CliResult:
        return self.cli("tasks", "run", self.node()["unique_id"])

    def server(self) -> dict[str, Any]:
        assert self.lab.client is not None
        (delivery,) = self.lab.client.device(self.device_id)["deliveries"]
        result: dict[str, Any] = delivery
        return result

    def crs(self) -> list[dict[str, Any]]:
        assert self.lab.client is not None
        return self.lab.client.crs(self.device_id)

    def context(self) -> DeviceContext:
        keys = ("DMAGENT_STATE_DIR", "DMAGENT_DEVICE_DEVICE_ID")
        return DeviceContext(load_config(None, env={k: self.env[k] for k in keys}))

    def install_key(self) -> str:
        return f"{SCEP_ROOT}\\{self.node()['unique_id']}\\Install"

    def challenge(self) -> str:
        with self.context() as ctx:
            key = self.install_key()
            blob = ctx.registry.query(key, CHALLENGE)
            assert isinstance(blob, bytes)
            return ctx.sealer.unseal(blob, challenge_purpose(ctx.registry, key)).decode()

    def put_challenge(self, value: str) -> None:
        with self.context() as ctx:
            key = self.install_key()
            ctx.registry.set_value(key, CHALLENGE, RegType.REG_BINARY,
                                   ctx.sealer.seal(value.encode(),
                                                   challenge_purpose(ctx.registry, key)))


@pytest.fixture(params=["micromdm", "ndes"])
def chain(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chain]:
    clock = ShiftableClock()
    with LabServer(tmp_path / "lab", clock=clock) as lab:
        if request.param == "micromdm":
            ca = micromdm_with_validator(lab.lab.path, tmp_path / "micromdm")
            stop = ca.stop
        else:
            from lab.scepca.notify import LabStateNotifier
            from lab.scepca.policy import FunctionVerifier, VerifyContext
            from lab.scepca.testing import LabScepCA
            from lab.validator import verify_csr

            def connector(ctx: VerifyContext) -> bool:
                # The lab's validator in-process, on the lab's clock (like the connector,
                # which shares Intune's notion of time); micromdm runs it as a program.
                verdict = verify_csr(lab.lab, ctx.csr_der, transaction_id=ctx.transaction_id,
                                     now=datetime.fromtimestamp(clock(), UTC))
                return verdict.ok

            ndes = LabScepCA(tmp_path / "ndes", mode="ndes",
                             verifier=FunctionVerifier(connector, "lab-validator"),
                             notifier=LabStateNotifier(lab.lab.db_path)).start()
            ca_pem = tmp_path / "ndes-ca.pem"
            ca_pem.write_bytes(ndes.ca_cert.public_bytes(Encoding.PEM))
            lab.configure(scep_url=ndes.url, scep_ca=str(ca_pem))
            stop = ndes.stop
        try:
            yield Chain(lab, clock, request.param)
        finally:
            stop()


@pytest.fixture
def new_device(chain: Chain, run_cli: Cli, tmp_path: Path) -> Callable[[str], Device]:
    def make(name: str) -> Device:
        device_id = f"D0000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}"
        assert chain.lab.client is not None
        chain.lab.client.set_device(device_id, name=name, upn="alice@lab.test")
        chain.lab.client.assign("device-client-auth", device=device_id)
        env = {"DMAGENT_STATE_DIR": str(tmp_path / name), "DMAGENT_SERVER_URL": chain.lab.url,
               "DMAGENT_SERVER_CA_BUNDLE": chain.lab.ca_bundle,
               "DMAGENT_DEVICE_DEVICE_ID": device_id, "DMAGENT_DEVICE_NAME": name,
               "DMAGENT_TPM_TCTI": ""}
        return Device(device_id, env, run_cli, chain.lab)

    return make


def assert_refused(device: Device, reason: str) -> None:
    """The attempt fails with FAILURE/badRequest, Status 16 and E_ACCESSDENIED; the lab's
    connector record says why; the next session reports the failure to the lab."""
    r = device.enroll()
    assert r.returncode == 1, r.stdout + r.stderr
    node = device.node()
    assert (node["status"], node["error_code"]) == (16, DENIED)
    events = device.cli("events", "--id", "307").stdout
    assert "badRequest" in events, events
    refused = [c for c in device.crs() if c["status"] == "refused"]
    assert refused and refused[-1]["reason"] == reason, device.crs()
    with device.context() as ctx:
        assert CertStore(ctx.registry).list_store(Scope.DEVICE, StoreName.MY) == []
    device.sync()
    server = device.server()
    assert (server["status"], server["error_code"]) == (16, to_signed(HResult.E_ACCESSDENIED))


def test_good_challenge_enrolls_and_reports(new_device: Callable[[str], Device]) -> None:
    dev = new_device("good")
    dev.sync()
    r = dev.enroll()
    assert r.returncode == 0, r.stdout + r.stderr
    node = dev.node()
    assert node["status"] == 1 and node["thumbprint"]
    dev.sync()
    assert dev.server()["thumbprint"] == node["thumbprint"]
    assert [c["status"] for c in dev.crs()][-1] == "issued"


def test_tampered_challenge_is_refused(new_device: Callable[[str], Device]) -> None:
    dev = new_device("tampered")
    dev.sync()
    token = base64.b64decode(dev.challenge()).decode()
    # Flip one hex digit of the token's signature: the token no longer verifies.
    tampered = re.sub(r"(<Signature>)([0-9A-Fa-f])",
                      lambda m: m.group(1) + ("0" if m.group(2) != "0" else "1"), token, count=1)
    assert tampered != token
    dev.put_challenge(base64.b64encode(tampered.encode()).decode())
    assert_refused(dev, "bad-signature")


def test_expired_challenge_is_refused(chain: Chain,
                                      new_device: Callable[[str], Device]) -> None:
    dev = new_device("expired")
    chain.clock.offset = -2 * 3600  # issued two hours ago: valid for 60 minutes
    dev.sync()
    chain.clock.offset = 0
    assert_refused(dev, "expired")


def test_reused_challenge_is_refused(new_device: Callable[[str], Device]) -> None:
    dev = new_device("reused")
    dev.sync()
    used = dev.challenge()
    assert dev.enroll().returncode == 0
    dev.put_challenge(used)  # replay the challenge that was already used
    r = dev.cli("certinst", "-k", dev.install_key().split("\\", 1)[1], "-h", "HKLM",
                "-t", dev.node()["unique_id"])
    assert r.returncode == 1
    assert [c["reason"] for c in dev.crs() if c["status"] == "refused"] == ["reused"]
    assert dev.node()["error_code"] == DENIED


def test_mismatched_subject_is_refused(new_device: Callable[[str], Device]) -> None:
    dev = new_device("mismatch")
    dev.sync()
    r = dev.cli("reg", "add", dev.install_key(), "/v", "SubjectName", "/d",
                "CN=someone-else,OU=Devices,O=dmagent lab", "/f")
    assert r.returncode == 0
    assert_refused(dev, "subject-mismatch")


# micromdm issues for whole days and runs the validator on the real clock; the lab CA runs it
# on the lab's clock, which the test moves past the renewal threshold.
@pytest.mark.parametrize("chain", ["ndes"], indirect=True)
def test_renewal_when_the_server_says_so_and_reenrollment_after_deletion(
        chain: Chain, new_device: Callable[[str], Device]) -> None:
    dev = new_device("renew")
    dev.sync()
    assert dev.enroll().returncode == 0
    first = dev.node()["thumbprint"]
    dev.sync()
    server = dev.server()
    assert server["thumbprint"] == first and server["renew_at"]
    # Nothing is due yet: a session changes nothing.
    dev.sync()
    assert dev.cli("tasks", "list", "--json").stdout.strip() == "[]"
    # Past the renewal threshold (computed by the lab from the certificate it issued; the
    # device never learns the threshold): the lab re-sends the profile with a new challenge.
    renew_at = datetime.fromisoformat(server["renew_at"]).timestamp()
    chain.clock.offset = renew_at - time.time() + 60
    dev.sync()
    assert dev.enroll().returncode == 0
    chain.clock.offset = 0  # back to now: the new certificate is far from its threshold
    second = dev.node()["thumbprint"]
    assert second != first
    with dev.context() as ctx:
        mine = CertStore(ctx.registry).by_unique_id(Scope.DEVICE, dev.node()["unique_id"])
        assert [c.thumbprint for c in mine] == [second]
        assert ctx.keystore("software").list_ids() == [mine[0].key_id]
    dev.sync()
    assert dev.server()["thumbprint"] == second
    # The user deletes the certificate: Status 16 / CRYPT_E_NOT_FOUND is reported, and the lab
    # sends a new challenge; the device enrolls again.
    r = dev.cli("reg", "delete",
                rf"HKLM\SOFTWARE\Microsoft\SystemCertificates\MY\Certificates\{second}", "/f")
    assert r.returncode == 0
    assert (dev.node()["status"], dev.node()["thumbprint"]) == (1, second)  # recorded value
    dev.sync()
    assert dev.enroll().returncode == 0
    third = dev.node()["thumbprint"]
    assert third not in (first, second)
    dev.sync()
    assert dev.server()["thumbprint"] == third


def test_no_secret_in_recorded_messages(chain: Chain,
                                        new_device: Callable[[str], Device]) -> None:
    dev = new_device("secret")
    dev.sync()
    challenge = dev.challenge()
    assert chain.lab.client is not None
    messages = chain.lab.client.messages(dev.device_id)
    assert challenge not in repr(messages)
    db = Path(dev.env["DMAGENT_STATE_DIR"]) / "registry.db"
    assert challenge.encode() not in db.read_bytes()
    assert os.stat(db).st_size > 0
