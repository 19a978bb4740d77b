"""The dmcertinst job against real parts: micromdm scepserver, swtpm, the registry store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.certinst import PENDING_KEY_ID, Certinst, CertinstRequest
from agent.certstore import CertStore, Scope, StoreName
from agent.config import load_config
from agent.csp.scep_values import CHALLENGE, challenge_purpose
from agent.device import DeviceContext
from agent.diagnostics import HResult, ScepStatus, to_signed
from agent.enrollment import EnrollmentStore
from agent.registry import RegType
from agent.taskstore import SYSTEM_SID, TaskStore
from tests.conftest import ScepServerInstance, SwtpmInstance

PROVIDER = "MS DM Server"
UID = "ModelName_AC_5d3c_LogicalName_286033f4_0515_Hash_68180377"


def make_ctx(state: Path, tcti: str = "") -> DeviceContext:
    env = {"DMAGENT_STATE_DIR": str(state), "DMAGENT_TPM_TCTI": tcti,
           "DMAGENT_DEVICE_DEVICE_ID": "dev-1"}
    return DeviceContext(load_config(None, env=env))


def provision(ctx: DeviceContext, server: ScepServerInstance, *, hive: str = "HKLM",
              challenge: str | None = None, thumbprint: str | None = None,
              key_protection: int = 3, url: str | None = None,
              attempts: int = 3) -> CertinstRequest:
    """Write an Install node and its task the way the CSP does on Exec Enroll."""
    reg = ctx.registry
    rel = rf"Software\Microsoft\SCEP\{PROVIDER}\{UID}\Install"
    key = f"{hive}\\{rel}"
    reg.set_sz(key, "ServerURL", url or server.url)
    reg.set_sz(key, "SubjectName", "CN=device-1, O=dmagent lab")
    reg.set_sz(key, "SubjectAlternativeNames", "3+device-1.lab.example;2+dev@lab.example")
    reg.set_sz(key, "EKUMapping", "1.3.6.1.5.5.7.3.2")
    reg.set_dword(key, "KeyUsage", 160)
    reg.set_dword(key, "KeyLength", 2048)
    reg.set_dword(key, "KeyProtection", key_protection)
    reg.set_dword(key, "RetryCount", 0)
    reg.set_sz(key, "CAThumbprint", thumbprint if thumbprint is not None else server.ca_thumbprint)
    sealed = ctx.sealer.seal((challenge or server.challenge).encode(),
                             challenge_purpose(reg, key))
    reg.set_value(key, CHALLENGE, RegType.REG_BINARY, sealed)
    enrollment = EnrollmentStore(reg).ensure("https://mdm.invalid/")
    sid = SYSTEM_SID if hive == "HKLM" else ctx.device.user_sid
    TaskStore(reg).create(enrollment.enrollment_id, UID, hive=hive, install_key=rel,  # type: ignore[arg-type]
                          sid=sid, now_ms=0, attempts=attempts, interval_seconds=0)
    return CertinstRequest(rel, hive, UID)  # type: ignore[arg-type]


def run(ctx: DeviceContext, req: CertinstRequest):  # type: ignore[no-untyped-def]
    return asyncio.run(Certinst(ctx).run(req))


@pytest.mark.parametrize("hive", ["HKLM", "HKCU"])
def test_software_enrollment_installs_and_cleans_up(tmp_path: Path,
                                                    scepserver: ScepServerInstance,
                                                    hive: str) -> None:
    ctx = make_ctx(tmp_path)
    req = provision(ctx, scepserver, hive=hive)
    outcome = run(ctx, req)
    assert outcome.ok, outcome
    reg = ctx.registry
    node = req.node_path
    assert reg.query(node, "Status") == ScepStatus.FINISHED
    assert reg.query(node, "ErrorCode") == 0
    assert reg.query(node, "CertThumbprint") == outcome.thumbprint
    assert reg.query(node, "RespondentServerUrl")
    assert reg.query(req.install_path, CHALLENGE) is None  # challenge deleted
    assert TaskStore(reg).list() == []  # task deleted
    assert reg.query(node, PENDING_KEY_ID) is None
    scope = Scope.USER if hive == "HKCU" else Scope.DEVICE
    stored = CertStore(reg).get(scope, StoreName.MY, outcome.thumbprint)
    cert = x509.load_der_x509_certificate(stored.der)
    key = ctx.keystore("software").load(stored.key_id)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert "CN=device-1" in stored.subject
    assert CertStore(reg).list_store(scope, StoreName.CA)  # the CA chain went to CA
    ids = [e.event_id for e in ctx.events.read()]
    assert ids == [36, 309, 39]
    # Re-enrolling the node (the server re-sent the profile) replaces the certificate and its key.
    req2 = provision(ctx, scepserver, hive=hive)
    second = run(ctx, req2)
    assert second.ok and second.thumbprint != outcome.thumbprint
    assert [c.thumbprint for c in CertStore(reg).by_unique_id(scope, UID)] == [second.thumbprint]
    assert ctx.keystore("software").list_ids() == [
        CertStore(reg).get(scope, StoreName.MY, second.thumbprint).key_id]
    ctx.close()


def test_tpm_key_enrollment(tmp_path: Path, scepserver: ScepServerInstance,
                            swtpm: SwtpmInstance) -> None:
    ctx = make_ctx(tmp_path, swtpm.tcti)
    req = provision(ctx, scepserver, key_protection=1)
    outcome = run(ctx, req)
    assert outcome.ok, outcome
    stored = CertStore(ctx.registry).get(Scope.DEVICE, StoreName.MY, outcome.thumbprint)
    assert stored.key_store == "tpm"
    assert (tmp_path / "keys" / "tpm").is_dir()
    assert ctx.keystore("software").list_ids() == []
    ctx.close()


def test_tpm_required_without_tpm_fails_with_tbs_error(tmp_path: Path,
                                                       scepserver: ScepServerInstance) -> None:
    ctx = make_ctx(tmp_path)
    req = provision(ctx, scepserver, key_protection=1, attempts=1)
    outcome = run(ctx, req)
    assert not outcome.ok and outcome.final
    assert ctx.registry.query(req.node_path, "Status") == ScepStatus.FAILED
    assert ctx.registry.query(req.node_path, "ErrorCode") == HResult.TBS_E_TPM_NOT_FOUND
    ctx.close()


def test_failures_count_attempts_and_clean_up_after_the_last(
        tmp_path: Path, scepserver_factory: Callable[..., ScepServerInstance]) -> None:
    server = scepserver_factory()
    ctx = make_ctx(tmp_path)
    dead_url = server.url.replace(str(server.port), "1")  # nothing listens on port 1
    req = provision(ctx, server, url=dead_url)
    first = run(ctx, req)
    assert (first.attempt, first.final, first.status) == (1, False, ScepStatus.FAILED)
    assert ctx.registry.query(req.install_path, CHALLENGE) is not None  # kept for the retry
    assert to_signed(ctx.registry.query(req.node_path, "ErrorCode")) == to_signed(  # type: ignore[arg-type]
        HResult.WINHTTP_CANNOT_CONNECT)
    run(ctx, req)
    third = run(ctx, req)
    assert (third.attempt, third.final) == (3, True)
    assert ctx.registry.query(req.install_path, CHALLENGE) is None
    assert TaskStore(ctx.registry).list() == []
    assert ctx.keystore("software").list_ids() == []  # the pending key went with the task
    assert [e.event_id for e in ctx.events.read()].count(32) == 3
    ctx.close()


def test_wrong_thumbprint_and_wrong_challenge(tmp_path: Path,
                                              scepserver: ScepServerInstance) -> None:
    ctx = make_ctx(tmp_path)
    req = provision(ctx, scepserver, thumbprint="00" * 20, attempts=1)
    outcome = run(ctx, req)
    assert outcome.hresult == HResult.CERT_E_UNTRUSTEDCA
    ctx.close()
    ctx = make_ctx(tmp_path / "b")
    req = provision(ctx, scepserver, challenge="wrong", attempts=1)
    outcome = run(ctx, req)
    assert not outcome.ok
    assert outcome.hresult == HResult.E_ACCESSDENIED  # FAILURE / badRequest
    assert CertStore(ctx.registry).list_store(Scope.DEVICE, StoreName.MY) == []
    ctx.close()


def test_orphan_key_from_a_killed_attempt_is_collected(tmp_path: Path,
                                                       scepserver: ScepServerInstance) -> None:
    from keystores.base import KeySpec

    ctx = make_ctx(tmp_path)
    req = provision(ctx, scepserver)
    orphan = ctx.keystore("software").create(KeySpec(label=UID))  # killed before recording
    unrelated = ctx.keystore("software").create(KeySpec(label="other"))
    outcome = run(ctx, req)
    assert outcome.ok
    ids = set(ctx.keystore("software").list_ids())
    assert orphan.key_id not in ids and unrelated.key_id in ids
    ctx.close()


def test_certificate_cryptography_refuses_is_not_installed(tmp_path: Path,
                                                           scepserver: ScepServerInstance) -> None:
    """The SCEP core reads only the fields it needs; before anything is written, certinst
    holds the issued certificate to strict DER. Here the CA pads the serial number with a
    needless zero octet (BER, not DER: X.690 §8.3.2): the attempt fails with
    CRYPT_E_BAD_ENCODE, nothing reaches the certificate store and the key is dropped."""
    from agent.scep import ber, der
    from agent.scep.certificate import Certificate
    from tests.scep_support import (
        Reply,
        ScepProxy,
        issue_from_csr,
        load_depot_ca,
        make_cert_rep,
        parse_request,
    )

    ca = load_depot_ca(scepserver.depot)

    def padded_serial(request_der: bytes, real: bytes) -> Reply:
        req = parse_request(request_der, ca)
        good = issue_from_csr(req.message_data, ca).public_bytes(Encoding.DER)
        outer = ber.sequence(ber.one_element(good), "Certificate")
        tbs = [e[4] for e in ber.sequence(outer[0], "TBSCertificate")]
        serial = ber.sequence(outer[0], "TBSCertificate")[1][3]
        tbs[1] = der.tlv(0x02, b"\x00" + serial)  # same value, one octet too many
        bad = der.seq(der.seq(*tbs), outer[1][4], outer[2][4])
        return Reply(make_cert_rep(req, ca, certs=(Certificate(bad), ca.cert)))

    proxy = ScepProxy(scepserver.url).start()
    try:
        proxy.on_pki = padded_serial
        ctx = make_ctx(tmp_path)
        req = provision(ctx, scepserver, url=proxy.url, attempts=1)
        outcome = run(ctx, req)
    finally:
        proxy.stop()
    assert not outcome.ok and outcome.final
    assert outcome.hresult == HResult.CRYPT_E_BAD_ENCODE
    assert ctx.registry.query(req.node_path, "Status") == ScepStatus.FAILED
    assert ctx.registry.query(req.node_path, "ErrorCode") == HResult.CRYPT_E_BAD_ENCODE
    assert CertStore(ctx.registry).list_store(Scope.DEVICE, StoreName.MY) == []
    assert CertStore(ctx.registry).list_store(Scope.DEVICE, StoreName.CA) == []
    assert ctx.keystore("software").list_ids() == []
    ctx.close()
