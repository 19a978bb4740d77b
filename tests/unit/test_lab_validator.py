"""The lab CSR validator (Intune connector analog): every refusal recorded with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lab.challenge import Reason
from lab.issue import issue_challenge
from lab.labdir import LabDir, init_lab
from lab.profiles import ExpandedProfile, Var, expand_profile, find_profile
from lab.state import LabState
from lab.testing import build_csr
from lab.validator import verify_csr

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DEVICE = "dev-0001"


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Env:
    lab: LabDir
    state: LabState
    expanded: ExpandedProfile

    def issue(self, now: datetime = NOW) -> str:
        token, _ = issue_challenge(self.lab, self.state, self.expanded, DEVICE, now)
        return token

    def csr(self, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, token: str | None,
            **changes: object) -> bytes:
        e = self.expanded
        args: dict[str, object] = {
            "subject": e.subject_pairs, "sans": [(int(t), v) for t, v in e.sans],
            "ekus": e.profile.ekus, "key_usage": e.profile.key_usage, "challenge": token}
        args.update(changes)
        return build_csr(key, **args)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    lab = init_lab(tmp_path / "lab")
    state = LabState(lab.db_path)
    profile = find_profile(lab.profiles(), "device-client-auth")
    assert profile is not None
    state.set_device(DEVICE, name="pc1")
    state.assign(profile.id, "device", DEVICE)
    expanded = expand_profile(profile, lab.config().account_id,
                              {Var.DEVICE_NAME: "pc1", Var.AAD_DEVICE_ID: DEVICE,
                               Var.DEVICE_ID: DEVICE})
    yield Env(lab, state, expanded)
    state.close()


def test_good_csr_is_accepted_once_and_recorded(env: Env, rsa2048: rsa.RSAPrivateKey) -> None:
    token = env.issue()
    csr = env.csr(rsa2048, token)
    first = verify_csr(env.lab, csr, now=NOW + timedelta(minutes=5), state=env.state)
    assert first.ok, first.line()
    second = verify_csr(env.lab, csr, now=NOW + timedelta(minutes=6), state=env.state)
    assert not second.ok and second.reason is Reason.REUSED
    rows = env.state.crs(DEVICE)
    assert [r["status"] for r in rows] == ["verified", "refused"]
    assert rows[0]["request_id"] == env.expanded.request_id and rows[0]["hresult"] == 0
    assert rows[1]["reason"] == "reused" and rows[1]["hresult"] == Reason.REUSED.hresult
    assert rows[0]["spki_sha1"] and rows[0]["subject"] == "CN=pc1,OU=Devices,O=dmagent lab"


def test_pem_is_accepted_too(env: Env, rsa2048: rsa.RSAPrivateKey) -> None:
    from cryptography import x509

    der = env.csr(rsa2048, env.issue())
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert verify_csr(env.lab, pem, now=NOW, state=env.state).ok


def _other_profile_changes(env: Env) -> dict[str, dict[str, object]]:
    e = env.expanded
    return {
        "subject": {"subject": [("2.5.4.3", "someone-else"), *e.subject_pairs[1:]]},
        "san": {"sans": [(3, "evil.lab.test")]},
        "eku": {"ekus": ["1.3.6.1.5.5.7.3.1"]},
        "key_usage": {"key_usage": 0x80},
        "no_key_usage": {"key_usage": None},
    }


@pytest.mark.parametrize(("case", "reason"), [
    ("subject", Reason.SUBJECT_MISMATCH),
    ("san", Reason.SAN_MISMATCH),
    ("eku", Reason.EKU_MISMATCH),
    ("key_usage", Reason.KEY_USAGE_MISMATCH),
    ("no_key_usage", Reason.KEY_USAGE_MISMATCH),
])
def test_mismatched_csr_is_refused(env: Env, rsa2048: rsa.RSAPrivateKey, case: str,
                                   reason: Reason) -> None:
    token = env.issue()
    verdict = verify_csr(env.lab, env.csr(rsa2048, token, **_other_profile_changes(env)[case]),
                         now=NOW, state=env.state)
    assert not verdict.ok and verdict.reason is reason, verdict.line()
    assert env.state.crs(DEVICE)[-1]["reason"] == reason.value
    # a refused CSR does not consume the challenge: the right CSR still goes through
    assert verify_csr(env.lab, env.csr(rsa2048, token), now=NOW, state=env.state).ok


@pytest.mark.parametrize("key_kind", ["rsa1024", "ec"])
def test_key_length_mismatch_is_refused(env: Env, key_kind: str) -> None:
    key = (rsa.generate_private_key(public_exponent=65537, key_size=1024)
           if key_kind == "rsa1024" else ec.generate_private_key(ec.SECP256R1()))
    verdict = verify_csr(env.lab, env.csr(key, env.issue()), now=NOW, state=env.state)
    assert verdict.reason is Reason.KEY_LENGTH_MISMATCH
    assert "2048" in verdict.detail


def test_expired_challenge_is_refused(env: Env, rsa2048: rsa.RSAPrivateKey) -> None:
    csr = env.csr(rsa2048, env.issue())
    verdict = verify_csr(env.lab, csr, now=NOW + timedelta(minutes=61), state=env.state)
    assert verdict.reason is Reason.EXPIRED
    assert env.state.crs(DEVICE)[-1]["hresult"] == 0x800B0101


def test_unassigned_profile_is_refused(env: Env, rsa2048: rsa.RSAPrivateKey) -> None:
    csr = env.csr(rsa2048, env.issue())
    assert env.state.unassign(env.expanded.profile.id, "device", DEVICE)
    verdict = verify_csr(env.lab, csr, now=NOW, state=env.state)
    assert verdict.reason is Reason.UNASSIGNED


def test_group_assignment_counts(env: Env, rsa2048: rsa.RSAPrivateKey) -> None:
    pid = env.expanded.profile.id
    env.state.unassign(pid, "device", DEVICE)
    env.state.set_device(DEVICE, groups=["kiosks"])
    env.state.assign(pid, "group", "kiosks")
    assert verify_csr(env.lab, env.csr(rsa2048, env.issue()), now=NOW, state=env.state).ok
    env.state.unassign(pid, "group", "kiosks")
    env.state.assign(pid, "group", "*")
    assert verify_csr(env.lab, env.csr(rsa2048, env.issue()), now=NOW, state=env.state).ok


def test_tampered_and_foreign_challenges_are_refused(env: Env, rsa2048: rsa.RSAPrivateKey,
                                                     tmp_path: Path) -> None:
    other = init_lab(tmp_path / "other")  # another lab's key signs a look-alike token
    with LabState(other.db_path) as other_state:
        token, _ = issue_challenge(other, other_state, env.expanded, DEVICE, NOW)
    verdict = verify_csr(env.lab, env.csr(rsa2048, token), now=NOW, state=env.state)
    assert verdict.reason is Reason.UNKNOWN_SIGNER
    good = env.issue()
    tampered = good[:40] + ("A" if good[40] != "A" else "B") + good[41:]
    verdict = verify_csr(env.lab, env.csr(rsa2048, tampered), now=NOW, state=env.state)
    assert verdict.reason in (Reason.MALFORMED, Reason.BAD_SIGNATURE)


@pytest.mark.parametrize(("challenge", "reason"), [
    (None, Reason.NO_CHALLENGE),
    ("secret", Reason.MALFORMED),
])
def test_missing_or_static_challenge_is_refused(env: Env, rsa2048: rsa.RSAPrivateKey,
                                                challenge: str | None, reason: Reason) -> None:
    verdict = verify_csr(env.lab, env.csr(rsa2048, challenge), now=NOW, state=env.state)
    assert verdict.reason is reason


def test_not_a_csr_is_refused(env: Env) -> None:
    verdict = verify_csr(env.lab, b"\x30\x03\x02\x01\x00", now=NOW, state=env.state)
    assert verdict.reason is Reason.BAD_CSR
    assert env.state.crs()[-1]["status"] == "refused"


def test_unknown_challenge_id_is_refused(env: Env, rsa2048: rsa.RSAPrivateKey) -> None:
    token = env.issue()
    env.state.db.execute("DELETE FROM challenges")  # e.g. the state was reset
    verdict = verify_csr(env.lab, env.csr(rsa2048, token), now=NOW, state=env.state)
    assert verdict.reason is Reason.UNKNOWN_CHALLENGE


def test_challenge_is_not_stored_in_state(env: Env) -> None:
    token = env.issue()
    dump = "\n".join(env.state.db.iterdump())
    assert token not in dump
