"""The agent's SCEP client (agent.scep.enroll) against the lab CA over real HTTP on loopback:
normal and NDES mode, GET and POST, PENDING → approve → poll, renewal, refusals, every
injected fault → the HRESULT the Windows client reports, and parallel enrolments."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.config import ScepConfig
from agent.csr import CsrRequest
from agent.diagnostics import FailInfo, HResult
from agent.errors import DmAgentError
from agent.scep.capabilities import ContentCipher
from agent.scep.certificate import as_certificate
from agent.scep.enroll import EnrollOptions, EnrollResult, enroll
from agent.scep.errors import ScepFailure, ScepPendingError
from agent.scep.messages import MessageType
from keystores.base import HashAlg
from lab.scepca.db import Status
from lab.scepca.notify import CrsRecord
from lab.scepca.policy import ExecVerifier
from lab.scepca.testing import LabScepCA
from tests.scep_support import CryptoKeyHandle

CaFactory = Callable[..., LabScepCA]


@pytest.fixture(scope="module")
def key_pool() -> list[CryptoKeyHandle]:
    return [CryptoKeyHandle.rsa() for _ in range(6)]


def _options(ca: LabScepCA, challenge: str = "secret", **kw: Any) -> EnrollOptions:
    csr = CsrRequest(subject=kw.pop("subject", "CN=lab-device"), challenge=challenge,
                     eku="1.3.6.1.5.5.7.3.2", key_usage=160)
    return EnrollOptions(ca.url, csr, ca_thumbprint=ca.thumbprint, **kw)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _check_issued(ca: LabScepCA, result: EnrollResult, key: CryptoKeyHandle) -> None:
    cert = result.certificate.to_x509()
    cert.verify_directly_issued_by(ca.ca_cert)
    assert cert.public_key() == key.public_key()
    row = ca.db.get(result.transaction_id)
    assert row is not None and row.status is Status.ISSUED
    assert row.cert == cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("post", [True, False], ids=["POST", "GET"])
@pytest.mark.parametrize("mode", ["normal", "ndes"])
def test_enroll(lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle], mode: str,
                post: bool) -> None:
    ca = lab_scep_ca(mode=mode)
    key = key_pool[0]
    result = _run(enroll(_options(ca, post=post), key))
    _check_issued(ca, result, key)
    assert result.algorithms.post is post
    if mode == "ndes":
        # NDES' 3DES/SHA-1 caps; the RA signing certificate signed the CertRep.
        assert (result.algorithms.cipher, result.algorithms.digest) == (ContentCipher.DES3,
                                                                        HashAlg.SHA1)
        assert result.ca.has_ra and result.ca.encryption == as_certificate(ca.ca.ra_enc.cert)
        assert result.respondent_url.endswith("/certsrv/mscep/mscep.dll/pkiclient.exe")
        assert as_certificate(ca.ca_cert) in result.chain
    else:
        assert (result.algorithms.cipher, result.algorithms.digest) == (ContentCipher.AES128,
                                                                        HashAlg.SHA256)
        assert not result.ca.has_ra


def test_wrong_challenge_is_failure_badrequest(lab_scep_ca: CaFactory,
                                               key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(mode="ndes", challenge="right")
    with pytest.raises(ScepFailure) as err:
        _run(enroll(_options(ca, challenge="wrong"), key_pool[0]))
    assert err.value.fail_info is FailInfo.BAD_REQUEST
    assert err.value.hresult == HResult.E_ACCESSDENIED
    assert err.value.fail_text == "challenge password is wrong"
    (row,) = ca.requests()
    assert row.status is Status.REJECTED and row.reason == "challenge password is wrong"
    (decision,) = ca.db.decisions()
    assert (decision.decider, decision.accepted) == ("static", False)


def test_pending_approve_poll(lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(pending="manual")
    approved: list[str] = []

    async def operator_sleep(seconds: float) -> None:
        # The agent waits RetryDelay between polls; meanwhile the operator approves.
        assert seconds == pytest.approx(0.05 * 0.6)  # RetryDelay × the test minute
        (row,) = [r for r in ca.requests() if r.status is Status.PENDING]
        ca.approve(row.transaction_id)
        approved.append(row.transaction_id)

    result = _run(enroll(_options(ca, retry_delay_minutes=0.05, retry_count=3), key_pool[1],
                         sleep=operator_sleep, minute_seconds=0.6))
    assert result.polls == 1 and approved == [result.transaction_id]
    _check_issued(ca, result, key_pool[1])
    row = ca.db.get(result.transaction_id)
    assert row is not None and row.polls == 1 and row.approved


def test_pending_timed_by_polls(lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(mode="ndes", pending="polls:3")
    result = _run(enroll(_options(ca, retry_delay_minutes=1, retry_count=5), key_pool[2],
                         minute_seconds=0.001))
    assert result.polls == 3


def test_pending_never_approved(lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(pending="manual")
    with pytest.raises(ScepPendingError) as err:
        _run(enroll(_options(ca, retry_delay_minutes=1, retry_count=2), key_pool[3],
                    minute_seconds=0.001))
    assert err.value.polls == 2 and err.value.hresult == HResult.E_PENDING
    (row,) = ca.requests()
    assert row.status is Status.PENDING and row.polls == 2


@pytest.mark.parametrize("mode", ["normal", "ndes"])
def test_renewal(lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle], mode: str) -> None:
    ca = lab_scep_ca(mode=mode)
    first = _run(enroll(_options(ca), key_pool[0]))
    new_key = key_pool[1]
    renewed = _run(enroll(_options(ca, challenge=""), new_key,
                          renew_with=(key_pool[0], first.certificate)))
    assert renewed.message_type is MessageType.RENEWAL_REQ
    _check_issued(ca, renewed, new_key)
    assert renewed.certificate.serial_number != first.certificate.serial_number
    assert [(r.message_type, r.status) for r in ca.requests()] == [
        (19, Status.ISSUED), (17, Status.ISSUED)]


# --- faults → the client's HRESULT --------------------------------------------------------------

FAULTS = [
    ("404@GetCACaps", HResult.HTTP_E_STATUS_NOT_FOUND),  # both URL forms: a real 404
    ("500@PKCSReq", HResult.HTTP_E_STATUS_SERVER_ERROR),
    ("503@PKIOperation", HResult.HTTP_E_STATUS_SERVICE_UNAVAIL),
    ("503@GetCACert", HResult.HTTP_E_STATUS_SERVICE_UNAVAIL),
    ("403@GetCACaps", HResult.HTTP_E_STATUS_FORBIDDEN),
    ("timeout@PKCSReq", HResult.WINHTTP_TIMEOUT),
    ("timeout@GetCACaps", HResult.WINHTTP_TIMEOUT),
    ("truncate@PKCSReq", HResult.CRYPT_E_ASN1_EOD),
    ("truncate@GetCACert", HResult.CRYPT_E_BAD_ENCODE),
    ("cut@PKCSReq", HResult.WINHTTP_CONNECTION_ERROR),
    ("cut@GetCACert", HResult.WINHTTP_CONNECTION_ERROR),
]


@pytest.mark.parametrize(("spec", "hresult"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_gives_the_windows_hresult(lab_scep_ca: CaFactory,
                                         key_pool: list[CryptoKeyHandle], spec: str,
                                         hresult: HResult) -> None:
    ca = lab_scep_ca(faults=[spec])
    started = time.monotonic()
    # A short client timeout only where the fault is a hang (a loaded machine must not turn
    # the other faults into timeouts).
    timeout = 1.0 if spec.startswith("timeout") else 20.0
    with pytest.raises(DmAgentError) as err:
        _run(enroll(_options(ca), key_pool[0], config=ScepConfig(timeout=timeout)))
    assert err.value.hresult == hresult, err.value.message
    assert time.monotonic() - started < 5  # a hung request never holds the client longer
    rule = ca.app.faults.rules()[0]
    assert rule.hits >= 1
    before_processing = spec.partition("@")[0].isdigit() or spec.startswith("timeout")
    if before_processing:  # the CA never saw the request
        assert ca.requests() == []
    # Clearing the fault clears the failure: the same device enrols.
    ca.clear_faults()
    _check_issued(ca, _run(enroll(_options(ca), key_pool[0])), key_pool[0])


def test_fault_for_the_next_n_requests_only(lab_scep_ca: CaFactory,
                                            key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(faults=["503@PKCSReq:count=2"])
    for _ in range(2):
        with pytest.raises(DmAgentError) as err:
            _run(enroll(_options(ca), key_pool[0]))
        assert err.value.hresult == HResult.HTTP_E_STATUS_SERVICE_UNAVAIL
    _run(enroll(_options(ca), key_pool[0]))


def test_reply_lost_after_issuance_then_retry_gets_the_same_cert(
        lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle]) -> None:
    """phase=after: the CA issues, the reply is lost (500); the device's next attempt with the
    same key and CSR is a retransmission and gets the same certificate, not a second one."""
    ca = lab_scep_ca(faults=["500@PKCSReq:phase=after,count=1"])
    with pytest.raises(DmAgentError) as err:
        _run(enroll(_options(ca), key_pool[0]))
    assert err.value.hresult == HResult.HTTP_E_STATUS_SERVER_ERROR
    (row,) = ca.requests()
    assert row.status is Status.ISSUED
    again = _run(enroll(_options(ca), key_pool[0]))
    assert f"{again.certificate.serial_number:X}".lstrip("0") == (row.serial or "").lstrip("0")
    assert len(ca.requests()) == 1


def test_slow_and_content_type_faults_still_enrol(lab_scep_ca: CaFactory,
                                                  key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(mode="ndes", faults=["slow@PKCSReq:delay=0.3",
                                          "content-type@GetCACert:value=text/html"])
    started = time.monotonic()
    _run(enroll(_options(ca), key_pool[0]))
    assert time.monotonic() - started >= 0.3
    assert {r.spec(): r.hits for r in ca.app.faults.rules()} == {
        "slow@PKCSReq:delay=0.3": 1, "content-type@GetCACert:value=text/html": 1}


def test_bad_time_from_a_ca_clock_ahead(lab_scep_ca: CaFactory,
                                        key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(clock_offset=3 * 86400.0)
    with pytest.raises(ScepFailure) as err:
        _run(enroll(_options(ca), key_pool[0]))
    assert err.value.fail_info is FailInfo.BAD_TIME
    assert err.value.hresult == HResult.CERT_E_EXPIRED


def test_ndes_caps_refuse_aes_with_badalg(lab_scep_ca: CaFactory,
                                          key_pool: list[CryptoKeyHandle]) -> None:
    ca = lab_scep_ca(mode="ndes")
    with pytest.raises(ScepFailure) as err:
        _run(enroll(_options(ca, cipher=ContentCipher.AES128), key_pool[0]))
    assert err.value.fail_info is FailInfo.BAD_ALG
    assert err.value.hresult == HResult.NTE_BAD_ALGID


# --- the policy module hooks --------------------------------------------------------------------

def test_exec_verifier_and_notify(lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle],
                                  tmp_path: Path) -> None:
    """An executable verifier (micromdm's -csrverifierexec contract) decides; Notify gets a
    CRS record with the device id from the challenge; CRS files land as the connector's."""
    script = tmp_path / "verify.py"
    script.write_text(
        "import sys\n"
        "from cryptography import x509\n"
        "csr = x509.load_der_x509_csr(sys.stdin.buffer.read())\n"
        "cn = csr.subject.rfc4514_string()\n"
        "ok = 'allowed' in cn\n"
        "print(('accepting ' if ok else 'refusing ') + cn, file=sys.stderr)\n"
        "sys.exit(0 if ok else 1)\n")
    records: list[CrsRecord] = []
    ca = lab_scep_ca(mode="ndes", verifier=ExecVerifier([sys.executable, str(script)]),
                     notifier=records.append, crs_dir=str(tmp_path / "crs"))
    challenge = json.dumps({"DeviceID": "dev-42", "CertificateRequestId": "req-9"})
    good = _run(enroll(_options(ca, challenge=challenge, subject="CN=allowed-1"), key_pool[0]))
    with pytest.raises(ScepFailure) as err:
        _run(enroll(_options(ca, challenge=challenge, subject="CN=denied-1"), key_pool[1]))
    assert err.value.fail_info is FailInfo.BAD_REQUEST
    assert "refusing CN=denied-1" in err.value.fail_text
    ok, failed = records
    assert (ok.status, ok.hresult, ok.device_id, ok.request_id) == (0, 0, "dev-42", "req-9")
    cert: x509.Certificate = good.certificate.to_x509()
    assert ok.thumbprint == cert.fingerprint(hashes.SHA1()).hex().upper()
    assert ok.serial.lstrip("0") == f"{cert.serial_number:X}".lstrip("0")
    assert (failed.status, failed.hresult) == (1, HResult.E_ACCESSDENIED)
    assert [p.name for p in (tmp_path / "crs" / "Succeed").iterdir()] == [
        f"{good.transaction_id.upper()}.CRS"]
    assert len(list((tmp_path / "crs" / "Failed").iterdir())) == 1
    decisions = ca.db.decisions()
    assert [(d.decider, d.accepted) for d in decisions] == [("exec", True), ("exec", False)]
    assert all(r.notify_hresult == 0 for r in ca.requests())


def test_failing_notifier_is_recorded_not_fatal(lab_scep_ca: CaFactory,
                                                key_pool: list[CryptoKeyHandle]) -> None:
    def broken(record: CrsRecord) -> None:
        raise RuntimeError("connector down")

    ca = lab_scep_ca(notifier=broken)
    result = _run(enroll(_options(ca), key_pool[0]))
    row = ca.db.get(result.transaction_id)
    assert row is not None and row.status is Status.ISSUED
    assert row.notify_hresult == HResult.E_FAIL


# --- parallel enrolments ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fifty_keys() -> list[CryptoKeyHandle]:
    return [CryptoKeyHandle.rsa() for _ in range(50)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["normal", "ndes"])
def test_fifty_parallel_enrolments(lab_scep_ca: CaFactory, mode: str,
                                   fifty_keys: list[CryptoKeyHandle]) -> None:
    """micromdm 2.1.0's file depot races here; the lab CA must give 50 unique serials and 50
    complete records."""
    ca = lab_scep_ca(mode=mode)
    keys = fifty_keys

    async def all_of_them() -> list[EnrollResult]:
        return await asyncio.gather(*(enroll(_options(ca, subject=f"CN=device-{i}"), k)
                                      for i, k in enumerate(keys)))

    started = time.monotonic()
    results = _run(all_of_them())
    elapsed = time.monotonic() - started
    serials = {r.certificate.serial_number for r in results}
    assert len(serials) == 50
    rows = ca.requests()
    assert len(rows) == 50 and all(r.status is Status.ISSUED for r in rows)
    assert {int(r.serial or "0", 16) for r in rows} == serials
    assert {r.subject for r in rows} == {f"CN=device-{i}" for i in range(50)}
    for result, key in zip(results, keys, strict=True):
        assert result.certificate.public_key() == key.public_key()
    print(f"\n50 parallel enrolments ({mode}): {elapsed:.2f}s")


def test_notify_into_the_lab_mdm_state(lab_scep_ca: CaFactory, key_pool: list[CryptoKeyHandle],
                                       tmp_path: Path) -> None:
    """The wiring the lead will use: Notify completes the CRS record that the lab MDM
    server's validator created for the request (matched by the key's SPKI SHA-1)."""
    from lab.scepca.notify import LabStateNotifier
    from lab.state import LabState

    key = key_pool[0]
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_sha1 = hashes.Hash(hashes.SHA1())
    spki_sha1.update(spki)
    state_db = tmp_path / "state.db"
    with LabState(state_db) as state:
        state.add_crs(time.time(), device_id="dev-1", spki_sha1=spki_sha1.finalize().hex()
                      .upper(), status="verified")
    ca = lab_scep_ca(notifier=LabStateNotifier(state_db))
    result = _run(enroll(_options(ca), key))
    with LabState(state_db) as state:
        (crs,) = state.crs("dev-1")
    thumbprint = result.certificate.to_x509().fingerprint(hashes.SHA1()).hex().upper()
    assert (crs["status"], crs["thumbprint"]) == ("issued", thumbprint)
    assert int(crs["serial"], 16) == result.certificate.serial_number
    assert crs["expires"] == result.certificate.not_valid_after_utc.timestamp()
