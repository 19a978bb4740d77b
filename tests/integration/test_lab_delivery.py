"""Intune-style profile delivery by the lab server, over HTTPS, to a scripted device: the
trusted root and the Atomic with a fresh challenge, follow-up Gets, renewal computed on the
server, re-delivery when the certificate is gone or failed (retry policy), removal on unassign,
user-scope profiles."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.syncml.session import SessionComplete
from lab import pki
from lab.challenge import open_token, thumbprint
from lab.mdm.delivery import CRYPT_E_NOT_FOUND_SIGNED, root_node, scep_node
from lab.testing import LabServer, ScriptedTree, run_session

DEV = "dev-deliv-0001"
DEVICE_PROFILE = "device-client-auth"
USER_PROFILE = "user-email"
DAY = 86400.0


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    lab: LabServer
    clock: Clock
    tree: ScriptedTree
    ca_thumb: str
    sessions: int = 0

    @property
    def client(self):  # type: ignore[no-untyped-def]
        assert self.lab.client is not None
        return self.lab.client

    def sync(self) -> SessionComplete:
        self.sessions += 1
        event, _ = run_session(self.lab.url, self.lab.ca_bundle, DEV, self.tree,
                               session_id=str(self.sessions))
        assert isinstance(event, SessionComplete), event
        return event

    def delivery(self, profile: str = DEVICE_PROFILE) -> dict[str, object]:
        pid = next(p["id"] for p in self.client.profiles()
                   if p["file"] and Path(p["file"]).stem == profile)
        return next(d for d in self.client.device(DEV)["deliveries"] if d["profile_id"] == pid)

    def uid(self, profile: str = DEVICE_PROFILE) -> str:
        return str(next(p["unique_id"] for p in self.client.profiles()
                        if p["file"] and Path(p["file"]).stem == profile))

    def node(self, leaf: str, profile: str = DEVICE_PROFILE, scope: str = "device") -> str:
        return f"{scep_node(scope, self.uid(profile))}/{leaf}"

    def report(self, status: int, error: int = 0, thumb: str = "",
               profile: str = DEVICE_PROFILE, scope: str = "device") -> None:
        """What dmcertinst leaves in the node for the next session's Gets."""
        self.tree.values[self.node("Status", profile, scope)] = str(status)
        self.tree.values[self.node("ErrorCode", profile, scope)] = str(error)
        self.tree.values[self.node("CertThumbprint", profile, scope)] = thumb

    def enrolls(self, profile: str = DEVICE_PROFILE, scope: str = "device") -> int:
        return sum(1 for kind, uri in self.tree.executed
                   if kind == "Exec" and uri == self.node("Install/Enroll", profile, scope))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    _key, ca = pki.make_ca("Issuing CA for the lab tests", datetime.now(UTC))
    ca_path = tmp_path / "ca.pem"
    pki.write_cert(ca_path, ca)
    clock = Clock(time.time())
    with LabServer(tmp_path / "lab", clock=clock,
                   config={"scep_url": "http://127.0.0.1:9/scep", "scep_ca": str(ca_path)}) as lab:
        tree = ScriptedTree(values={"./DevDetail/Ext/Microsoft/DeviceName": "pc1"})
        assert lab.client is not None
        lab.client.assign(DEVICE_PROFILE, device=DEV)
        yield Env(lab, clock, tree, thumbprint(ca))


def test_first_session_delivers_root_then_atomic_with_a_fresh_challenge(env: Env) -> None:
    env.sync()
    root = root_node("device", env.ca_thumb)
    kinds = [k for k, _ in env.tree.executed]
    uris = [u for _, u in env.tree.executed]
    assert uris.index(root) < uris.index(env.node("Install/ServerURL"))
    assert kinds[uris.index(root)] == "Add"
    assert uris[-1] == env.node("Install/Enroll") and kinds[-1] == "Exec"
    v = env.tree.values
    assert v[env.node("Install/SubjectName")] == "CN=pc1,OU=Devices,O=dmagent lab"  # inventory
    assert v[env.node("Install/SubjectAlternativeNames")] == f"3+pc1.lab.test;7+urn:device:{DEV}"
    assert v[env.node("Install/CAThumbprint")] == env.ca_thumb
    assert v[env.node("Install/ServerURL")] == "http://127.0.0.1:9/scep"
    token = v[env.node("Install/Challenge")]
    lab = env.lab.lab
    claims = open_token(token, lab.signer_certs(), now=datetime.fromtimestamp(env.clock.now, UTC),
                        encryption_key=lab.encryption_key())
    assert claims.device_id == DEV and claims.unique_id == env.uid()
    assert claims.subject[0] == ("2.5.4.3", "pc1")
    d = env.delivery()
    assert d["state"] == "delivered" and d["attempts"] == 1
    assert d["challenge_id"] == claims.challenge_id
    # the challenge is a secret: never in the recorded messages or queue
    bodies = [m["body"] or "" for m in env.client.messages(DEV)]
    assert not any(token in b for b in bodies)
    assert any(f"***challenge {claims.challenge_id}" in b for b in bodies)
    assert not any(token in (c["xml"] or "") for c in env.client.commands(DEV))


def test_follow_up_renewal_on_the_server_side(env: Env) -> None:
    env.sync()
    first_token = env.tree.values[env.node("Install/Challenge")]
    # the CA issued a one-year certificate; it records it (as the lab CA does) by thumbprint
    thumb = "AB" * 20
    issued = env.clock.now
    env.lab.state.add_crs(issued, device_id=DEV, thumbprint=thumb, serial="01",
                          not_before=issued, expires=issued + 365 * DAY, status="issued")
    env.report(1, 0, thumb)
    env.sync()
    d = env.delivery()
    assert d["state"] == "installed" and d["thumbprint"] == thumb
    assert env.enrolls() == 1  # not due: no new challenge
    gets = [u for k, u in env.tree.executed if k == "Get"]
    assert {env.node("Status"), env.node("ErrorCode"), env.node("CertThumbprint")} <= set(gets)
    # 20% of the lifetime left → renewal (computed by the lab; the device never knew)
    env.clock.now = issued + 365 * DAY * 0.81
    env.sync()
    assert env.enrolls() == 2
    assert env.tree.values[env.node("Install/Challenge")] != first_token
    d = env.delivery()
    assert d["state"] == "delivered" and d["attempts"] == 2
    assert "renewal" in str(d["detail"])
    roots = [u for k, u in env.tree.executed if u == root_node("device", env.ca_thumb)]
    assert len(roots) == 1  # the root went once


@pytest.mark.parametrize(("status", "error", "thumb"), [
    (1, 0, ""),  # the device reports no thumbprint: the certificate was deleted
    (16, CRYPT_E_NOT_FOUND_SIGNED, ""),  # Status 16 with 0x80092004
])
def test_removed_certificate_is_delivered_again_at_once(env: Env, status: int, error: int,
                                                        thumb: str) -> None:
    env.sync()
    env.report(status, error, thumb)
    env.sync()
    assert env.enrolls() == 2


def test_missing_node_is_delivered_again(env: Env) -> None:
    env.sync()
    for k in [k for k in env.tree.values if "ClientCertificateInstall" in k]:
        del env.tree.values[k]  # e.g. the device was reset: Get Status → 404
    env.sync()
    assert env.enrolls() == 2


def test_failure_is_retried_at_the_next_session_up_to_max_attempts(env: Env) -> None:
    env.lab.configure(delivery={"max_attempts": 2})
    env.sync()
    env.report(16, -2145844748)  # 0x801901F4: the CA answered HTTP 500
    env.sync()
    d = env.delivery()
    assert d["state"] == "failed" and d["error_code"] == -2145844748
    assert env.enrolls() == 1  # observed now, retried at the next session
    env.sync()
    assert env.enrolls() == 2
    env.report(16, -2145844748)
    env.sync()
    env.sync()
    assert env.enrolls() == 2  # max_attempts reached
    assert "giving up" in str(env.delivery()["detail"])


def test_pending_enrollment_is_left_alone(env: Env) -> None:
    env.sync()
    env.report(32, 0)
    env.sync()
    env.sync()
    assert env.enrolls() == 1 and env.delivery()["state"] == "enrolling"


def test_failed_atomic_is_recorded_and_retried(env: Env) -> None:
    env.tree.fail[env.node("Install/KeyLength")] = 405
    env.sync()
    d = env.delivery()
    assert d["state"] == "atomic-failed" and d["status"] == 507
    assert env.node("Install/ServerURL") not in env.tree.values  # rolled back by the device
    del env.tree.fail[env.node("Install/KeyLength")]
    env.sync()
    assert env.delivery()["state"] == "delivered"


def test_unassigned_profile_is_removed(env: Env) -> None:
    env.sync()
    env.client.unassign(DEVICE_PROFILE, device=DEV)
    env.sync()
    assert ("Delete", scep_node("device", env.uid())) in env.tree.executed
    assert not [k for k in env.tree.values if env.uid() in k]
    assert env.client.device(DEV)["deliveries"] == []


def test_failed_removal_is_retried(env: Env) -> None:
    env.sync()
    env.client.unassign(DEVICE_PROFILE, device=DEV)
    env.tree.fail[scep_node("device", env.uid())] = 500
    env.sync()
    assert env.delivery()["state"] == "remove-failed"
    del env.tree.fail[scep_node("device", env.uid())]
    env.sync()
    assert env.client.device(DEV)["deliveries"] == []


def test_user_profile_waits_for_a_upn_then_goes_to_the_user_scope(env: Env) -> None:
    env.client.assign(USER_PROFILE, group="*")
    env.sync()
    d = env.delivery(USER_PROFILE)
    assert d["state"] == "not-applicable" and "UserName" in str(d["detail"])
    env.client.set_device(DEV, upn="joy@lab.test")
    env.sync()
    assert env.enrolls(USER_PROFILE, "user") == 1
    v = env.tree.values
    assert v[env.node("Install/SubjectName", USER_PROFILE, "user")] == "CN=joy,E=joy@lab.test"
    assert v[env.node("Install/SubjectAlternativeNames", USER_PROFILE, "user")] == \
        "11+joy@lab.test;2+joy@lab.test"
    assert env.node("Install/Enroll", USER_PROFILE, "user").startswith("./User/")


def test_edited_profile_lands_in_a_new_node(env: Env) -> None:
    env.sync()
    old = env.uid()
    path = env.lab.lab.profiles_path / f"{DEVICE_PROFILE}.toml"
    path.write_text(path.read_text().replace("key_length = 2048", "key_length = 4096"))
    env.sync()
    assert env.uid() != old
    assert env.tree.values[env.node("Install/KeyLength")] == "4096"
    assert "profile changed" in str(env.delivery()["detail"])


def test_nodecache_watches_the_thumbprint_instead_of_reading_it(env: Env) -> None:
    env.lab.configure(delivery={"nodecache": True})
    env.sync()
    thumb = "CD" * 20
    env.report(1, 0, thumb)
    env.sync()  # follow-up: installed → NodeCache set up for its CertThumbprint
    cache = "./Vendor/MSFT/NodeCache/MS%20DM%20Server"
    assert env.tree.values[f"{cache}/Nodes/1/NodeURI"] == env.node("CertThumbprint")
    assert env.tree.values[f"{cache}/Nodes/1/ExpectedValue"] == thumb
    d = env.delivery()
    assert d["nodecache_id"] == "1" and d["nodecache_expected"] == thumb
    env.tree.executed.clear()
    env.sync()  # unchanged: only ChangedNodes is read, no follow-up Gets
    gets = [u for k, u in env.tree.executed if k == "Get"]
    assert gets == [f"{cache}/ChangedNodes"]
    # the certificate disappears: ChangedNodes lists node 1 → follow-up → delivered again
    env.report(1, 0, "")
    env.tree.executed.clear()
    env.sync()
    gets = [u for k, u in env.tree.executed if k == "Get"]
    assert gets[0] == f"{cache}/ChangedNodes" and env.node("CertThumbprint") in gets
    assert env.enrolls() == 1 and env.delivery()["state"] == "delivered"
