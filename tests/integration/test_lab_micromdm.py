"""micromdm scepserver 2.1.0 with `-csrverifierexec` pointing at the lab validator: lab
challenges accepted once, refused when reused, for another subject, or not lab tokens; every
decision in the CRS table; the static `-challenge` cannot be combined with it."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.csr import CsrRequest
from agent.diagnostics import FailInfo
from agent.scep.enroll import EnrollOptions, EnrollResult, enroll
from agent.scep.errors import ScepFailure
from agent.sealing import Sealer
from keystores.base import KeyAlgorithm, KeySpec
from keystores.software import SoftwareKeyStore
from lab.issue import issue_challenge
from lab.labdir import LabDir, init_lab
from lab.mdm.certindex import CertIndex
from lab.profiles import ExpandedProfile, Var, expand_profile, find_profile
from lab.state import LabState
from lab.testing import MicromdmInstance, micromdm_with_validator
from tests.conftest import ScepServerInstance, need_binary

pytestmark = pytest.mark.scepserver

DEV = "dev-mm-0001"


@dataclass
class Env:
    lab: LabDir
    state: LabState
    mm: MicromdmInstance
    expanded: ExpandedProfile
    keys: SoftwareKeyStore

    def challenge(self) -> str:
        token, _ = issue_challenge(self.lab, self.state, self.expanded, DEV, datetime.now(UTC))
        return token

    def enroll(self, token: str, *, subject: str | None = None) -> EnrollResult:
        e = self.expanded
        csr = CsrRequest(subject=subject or e.subject_text, subject_alt_names=e.san_text,
                         key_usage=e.profile.key_usage, eku="+".join(e.profile.ekus),
                         challenge=token)
        opts = EnrollOptions(server_url=self.mm.url, csr=csr, ca_thumbprint=self.mm.ca_thumbprint,
                             retry_count=0)
        key = self.keys.create(KeySpec(KeyAlgorithm.RSA, 2048))  # the software KSP
        return asyncio.run(enroll(opts, key))


def _keys(tmp_path: Path) -> SoftwareKeyStore:
    return SoftwareKeyStore(tmp_path / "keys", Sealer(secrets.token_bytes(32)))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_binary("scepserver")
    lab = init_lab(tmp_path / "lab")
    mm = micromdm_with_validator(lab, tmp_path / "mm")
    state = LabState(lab.db_path)
    profile = find_profile(lab.profiles(), "device-client-auth")
    assert profile is not None
    state.set_device(DEV, name="pc1")
    state.assign(profile.id, "device", DEV)
    expanded = expand_profile(profile, lab.config().account_id,
                              {Var.DEVICE_NAME: "pc1", Var.AAD_DEVICE_ID: DEV})
    try:
        yield Env(lab, state, mm, expanded, _keys(tmp_path))
    finally:
        mm.stop()
        state.close()


def test_lab_config_points_at_the_instance(env: Env) -> None:
    cfg = env.lab.config()
    assert cfg.scep_url == env.mm.url and Path(cfg.scep_depot) == env.mm.depot
    assert env.lab.verifier_path.stat().st_mode & 0o111


def test_good_challenge_is_issued_once(env: Env) -> None:
    token = env.challenge()
    result = env.enroll(token)
    cert = result.certificate
    assert cert.to_x509().subject.rfc4514_string() == "CN=pc1,OU=Devices,O=dmagent lab"
    crs = env.state.crs(DEV)
    assert [r["status"] for r in crs] == ["verified"]
    assert crs[0]["request_id"] == env.expanded.request_id
    # the issued certificate is found in micromdm's depot by thumbprint and completes the CRS
    info = CertIndex(env.state, str(env.mm.depot)).find(cert.thumbprint)
    assert info is not None and info.not_after > info.not_before
    row = env.state.crs(DEV)[0]
    assert row["status"] == "issued" and row["thumbprint"] == cert.thumbprint
    # the same challenge again (another key): refused, CertRep FAILURE badRequest
    with pytest.raises(ScepFailure) as failure:
        env.enroll(token)
    assert failure.value.fail_info is FailInfo.BAD_REQUEST
    last = env.state.crs(DEV)[-1]
    assert (last["status"], last["reason"]) == ("refused", "reused")


def test_csr_for_another_subject_is_refused(env: Env) -> None:
    with pytest.raises(ScepFailure) as failure:
        env.enroll(env.challenge(), subject="CN=someone-else,OU=Devices,O=dmagent lab")
    assert failure.value.fail_info is FailInfo.BAD_REQUEST
    last = env.state.crs(DEV)[-1]
    assert last["reason"] == "subject-mismatch" and "someone-else" in last["detail"]


def _scepclient(env: Env, workdir: Path, challenge: str,
                cn: str) -> subprocess.CompletedProcess[str]:
    exe = need_binary("scepclient")
    workdir.mkdir()
    # scepclient writes csr.pem/self.pem in its working directory: give it a fresh one
    return subprocess.run([exe, "-server-url", env.mm.url, "-private-key", "k.pem",
                           "-certificate", "c.pem", "-challenge", challenge, "-cn", cn],
                          cwd=workdir, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("which", "reason"), [
    ("lab", "subject-mismatch"),  # a real lab challenge, but scepclient's own subject
    ("static", "malformed"),  # a static password is not a lab token
])
def test_scepclient_is_refused(env: Env, tmp_path: Path, which: str, reason: str) -> None:
    challenge = env.challenge() if which == "lab" else "secret"
    proc = _scepclient(env, tmp_path / f"client-{which}", challenge, "pc1")
    assert proc.returncode != 0
    assert "badRequest" in proc.stdout + proc.stderr
    assert env.state.crs()[-1]["reason"] == reason
    assert not (tmp_path / f"client-{which}" / "c.pem").exists()


def test_static_challenge_cannot_be_combined(tmp_path: Path) -> None:
    lab = init_lab(tmp_path / "lab")
    with pytest.raises(ValueError, match="cannot be combined"):
        micromdm_with_validator(lab, tmp_path / "mm", challenge="secret")


def test_why_static_challenge_and_validator_exclude_each_other(
        tmp_path: Path, scepserver_factory: Callable[..., ScepServerInstance]) -> None:
    """micromdm chains its static check after the verifier: the lab accepts, scepserver still
    refuses (the lab token is not the static password)."""
    lab = init_lab(tmp_path / "lab")
    inst = scepserver_factory(challenge="secret", csr_verifier=str(lab.write_verifier()))
    state = LabState(lab.db_path)
    try:
        profile = find_profile(lab.profiles(), "device-client-auth")
        assert profile is not None
        state.assign(profile.id, "device", DEV)
        expanded = expand_profile(profile, lab.config().account_id,
                                  {Var.DEVICE_NAME: "pc1", Var.AAD_DEVICE_ID: DEV})
        mm = MicromdmInstance(inst.port, inst.depot, inst.proc, inst.log_path)
        env = Env(lab, state, mm, expanded, _keys(tmp_path))
        with pytest.raises(ScepFailure):
            env.enroll(env.challenge())
        assert state.crs(DEV)[-1]["status"] == "verified"  # the lab said yes
        assert "invalid challenge" in inst.log()  # scepserver's own check said no
    finally:
        state.close()
