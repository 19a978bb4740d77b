"""The lab CA's parts: fault rules, CSR reading, CRS records, challenge parsing, the database
state machine (across processes), the pending policy and the challenge verifiers."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import core
from cryptography import x509

from agent.csr import CsrRequest, build_csr, extension, oid, seq, set_of, subject_der, tlv
from lab.scepca.config import PendingKind, PendingPolicy
from lab.scepca.csrinfo import CsrError, parse_csr, parse_validity
from lab.scepca.db import CADatabase, Status
from lab.scepca.faults import FaultKind, FaultRule, FaultSet, FaultSpecError, parse_fault
from lab.scepca.notify import ChallengeInfo, CrsDirectoryNotifier, CrsRecord, parse_challenge
from lab.scepca.policy import (
    ExecVerifier,
    FunctionVerifier,
    NoChallenge,
    StaticChallenge,
    Verdict,
    VerifyContext,
)
from lab.scepca.service import key_usage_from_bits
from tests.scep_support import CryptoKeyHandle

# --- fault rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "want"), [
    ("503", FaultRule(FaultKind.STATUS, status=503)),
    ("404@GetCACaps", FaultRule(FaultKind.STATUS, op="GetCACaps", status=404)),
    ("500@pkcsreq:count=2", FaultRule(FaultKind.STATUS, op="PKCSReq", status=500, count=2)),
    ("timeout@GetCACert", FaultRule(FaultKind.TIMEOUT, op="GetCACert", delay=3600.0)),
    ("timeout:delay=1.5", FaultRule(FaultKind.TIMEOUT, delay=1.5)),
    ("slow:delay=0.2,fraction=0.5", FaultRule(FaultKind.SLOW, delay=0.2, fraction=0.5)),
    ("truncate@PKIOperation:bytes=10", FaultRule(FaultKind.TRUNCATE, op="PKIOperation",
                                                 size=10)),
    ("cut", FaultRule(FaultKind.CUT)),
    ("content-type@GetCACert:value=text/plain",
     FaultRule(FaultKind.CONTENT_TYPE, op="GetCACert", content_type="text/plain")),
    ("500@PKCSReq:phase=after,count=1",
     FaultRule(FaultKind.STATUS, op="PKCSReq", status=500, phase="after", count=1)),
])
def test_parse_fault(spec: str, want: FaultRule) -> None:
    rule = parse_fault(spec)
    assert rule == want
    assert parse_fault(rule.spec()) == rule  # the text form round-trips


@pytest.mark.parametrize(("spec", "error"), [
    ("teapot", "unknown fault kind"),
    ("999", "out of range"),
    ("503@Bogus", "unknown operation"),
    ("503:count=x", "not a number"),
    ("503:count", "not key=value"),
    ("503:fraction=2", "within 0..1"),
    ("503:phase=during", "before or after"),
    ("503:colour=red", "unknown option"),
])
def test_parse_fault_errors(spec: str, error: str) -> None:
    with pytest.raises(FaultSpecError, match=error):
        parse_fault(spec)


def test_faultset_count_phase_and_operation() -> None:
    faults = FaultSet([parse_fault("503@PKCSReq:count=2"), parse_fault("404@GetCACaps"),
                       parse_fault("500@PKIOperation:phase=after,count=1")])
    assert faults.take("GetCACert", None, "before") is None
    assert faults.take("PKIOperation", "CertPoll", "before") is None  # PKCSReq only
    assert [faults.take("PKIOperation", "PKCSReq", "before") is not None
            for _ in range(3)] == [True, True, False]
    assert all(faults.take("GetCACaps", None, "before") for _ in range(5))  # unlimited
    after = faults.take("PKIOperation", "CertPoll", "after")
    assert after is not None and after.status == 500
    assert faults.take("PKIOperation", "CertPoll", "after") is None
    hits = {r.spec(): r.hits for r in faults.rules()}
    assert hits == {"503@PKCSReq:count=2": 2, "404@GetCACaps": 5,
                    "500@PKIOperation:count=1,phase=after": 1}
    assert faults.remove(2) and not faults.remove(2)
    faults.clear()
    assert faults.rules() == []


def test_faultset_fraction_is_a_probability() -> None:
    faults = FaultSet([parse_fault("503:fraction=0.25")], seed=7)
    fired = sum(faults.take("GetCACaps", None, "before") is not None for _ in range(2000))
    assert 400 < fired < 600


# --- CSR reading ------------------------------------------------------------------------------

def _key() -> CryptoKeyHandle:
    return CryptoKeyHandle.rsa(1024)


def test_parse_csr_reads_what_windows_sends() -> None:
    der = build_csr(CsrRequest(subject="CN=dev, O=Lab", challenge="pässword",
                               subject_alt_names="3+dev.lab.test", key_usage=0x80,
                               eku="1.3.6.1.5.5.7.3.2", template_name="LabUser",
                               valid_period="Months", valid_period_units=3), _key())
    info = parse_csr(der)
    assert info.challenge == "pässword"
    assert info.template_name == "LabUser"
    assert info.requested_validity == timedelta(days=90)
    assert info.ekus == ("1.3.6.1.5.5.7.3.2",)
    assert info.key_usage is not None and info.key_usage.digital_signature
    assert info.san is not None
    assert "dev.lab.test" in info.names() and "dev" in info.names()


def _csr_with_attributes(key: CryptoKeyHandle, attrs: list[bytes]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    from keystores.base import HashAlg

    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    info = seq(b"\x02\x01\x00", subject_der("CN=x"), spki, tlv(0xA0, *sorted(attrs)))
    sig = key.sign(info, HashAlg.SHA256)
    return seq(info, seq(oid("1.2.840.113549.1.1.11"), b"\x05\x00"), tlv(0x03, b"\x00", sig))


def _bmp(text: str) -> bytes:
    return bytes(core.BMPString(text).dump())


def test_name_value_pairs_one_pair_per_value() -> None:
    """Both encodings seen in the wild: one pair per SET value, or one SEQUENCE OF pairs."""
    key = _key()
    pairs = [seq(_bmp("ValidityPeriod"), _bmp("Weeks")),
             seq(_bmp("ValidityPeriodUnits"), _bmp("2")),
             seq(_bmp("CertificateTemplate"), _bmp("Tmpl"))]
    der = _csr_with_attributes(key, [seq(oid("1.3.6.1.4.1.311.13.2.1"), set_of(pairs))])
    info = parse_csr(der)
    assert info.requested_validity == timedelta(days=14)
    assert info.template_name == "Tmpl"


@pytest.mark.parametrize(("pairs", "want"), [
    ((("ValidityPeriod", "Years"), ("ValidityPeriodUnits", "1")), timedelta(days=365)),
    ((("validityperiod", "days"), ("ValidityPeriodUnits", "7")), timedelta(days=7)),
    ((("ValidityPeriod", "Years"),), None),
    ((), None),
])
def test_parse_validity(pairs: tuple[tuple[str, str], ...], want: timedelta | None) -> None:
    assert parse_validity(pairs) == want


@pytest.mark.parametrize(("pairs", "error"), [
    ((("ValidityPeriod", "Fortnights"), ("ValidityPeriodUnits", "1")), "unknown"),
    ((("ValidityPeriod", "Days"), ("ValidityPeriodUnits", "x")), "not a number"),
    ((("ValidityPeriod", "Days"), ("ValidityPeriodUnits", "0")), "positive"),
])
def test_parse_validity_errors(pairs: tuple[tuple[str, str], ...], error: str) -> None:
    with pytest.raises(CsrError, match=error):
        parse_validity(pairs)


def test_parse_csr_refuses_bad_input() -> None:
    with pytest.raises(CsrError, match="not a PKCS#10") as err:
        parse_csr(b"\x30\x03\x02\x01\x00")
    assert not err.value.bad_signature
    der = bytearray(build_csr(CsrRequest(subject="CN=x"), _key()))
    der[-1] ^= 0x01  # the signature's last byte
    with pytest.raises(CsrError, match="does not verify") as err:
        parse_csr(bytes(der))
    assert err.value.bad_signature
    bad_ext = _csr_with_attributes(_key(), [seq(oid("1.2.840.113549.1.9.14"), set_of([seq(
        extension("2.5.29.15", b"\x05\x00"))]))])
    with pytest.raises(CsrError, match="extension request"):
        parse_csr(bad_ext)


@pytest.mark.parametrize(("bits", "names"), [
    (0xA0, {"digital_signature", "key_encipherment"}),
    (0x80, {"digital_signature"}),
    (0x06, {"key_cert_sign", "crl_sign"}),
])
def test_key_usage_from_bits(bits: int, names: set[str]) -> None:
    ku = key_usage_from_bits(bits)
    on = {n for n in ("digital_signature", "content_commitment", "key_encipherment",
                      "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign")
          if getattr(ku, n)}
    assert on == names


# --- challenge parsing and CRS records --------------------------------------------------------

_TOKEN = ("<CertEnrollToken><Data><CertEnrollChallenge>MIIN</CertEnrollChallenge></Data>"
          "<DeviceID>58c120b7-a22a-428f-89de-7b0856e0c43e</DeviceId>"
          "<UserID>d35ca381</UserID>"
          "<CertificateRequestId>ModelName=AC_1/LogicalName_2;Version=1;Hash=13</Certificate"
          "RequestId></CertEnrollToken>")


@pytest.mark.parametrize(("challenge", "want"), [
    (base64.b64encode(_TOKEN.encode()).decode(),
     ChallengeInfo("58c120b7-a22a-428f-89de-7b0856e0c43e", "d35ca381",
                   "ModelName=AC_1/LogicalName_2;Version=1;Hash=13")),
    (_TOKEN, ChallengeInfo("58c120b7-a22a-428f-89de-7b0856e0c43e", "d35ca381",
                           "ModelName=AC_1/LogicalName_2;Version=1;Hash=13")),
    (json.dumps({"device_id": "dev-7", "request_id": "r1", "nonce": "x"}),
     ChallengeInfo("dev-7", "", "r1")),
    (base64.b64encode(json.dumps({"DeviceID": "dev-8"}).encode()).decode(),
     ChallengeInfo("dev-8")),
    ("device=dev-9;user=u1", ChallengeInfo("dev-9", "u1")),
    ("secret", ChallengeInfo()),
    ("", ChallengeInfo()),
    (None, ChallengeInfo()),
])
def test_parse_challenge(challenge: str | None, want: ChallengeInfo) -> None:
    assert parse_challenge(challenge) == want


def test_crs_record_xml_and_directory(tmp_path: Path) -> None:
    ok = CrsRecord(transaction_id="4802535d6cdeb195", status=0, hresult=0, device_id="dev",
                   serial="31000000", thumbprint="5842", request_id="ModelName=AC_1",
                   expiration=datetime(2022, 4, 11, 16, 26, 36, tzinfo=UTC))
    failed = CrsRecord(transaction_id="abc", status=1, hresult=0x80070005)
    notifier = CrsDirectoryNotifier(tmp_path)
    notifier(ok)
    notifier(failed)
    text = (tmp_path / "Succeed" / "4802535D6CDEB195.CRS").read_text()
    assert "<CertExpirationDate>4/11/2022 4:26:36 PM</CertExpirationDate>" in text
    assert "<DeviceID>dev</DeviceID>" in text and "<HResult>0</HResult>" in text
    bad = (tmp_path / "Failed" / "ABC.CRS").read_text()
    assert "<HResult>-2147024891</HResult>" in bad and "<Status>1</Status>" in bad


# --- pending policy and verifiers -------------------------------------------------------------

@pytest.mark.parametrize(("text", "kind", "value"), [
    ("none", PendingKind.NONE, 0.0), ("manual", PendingKind.MANUAL, 0.0),
    ("after:2.5", PendingKind.AFTER_SECONDS, 2.5), ("polls:3", PendingKind.AFTER_POLLS, 3.0),
    ("MANUAL", PendingKind.MANUAL, 0.0),
])
def test_pending_policy_parse(text: str, kind: PendingKind, value: float) -> None:
    policy = PendingPolicy.parse(text)
    assert (policy.kind, policy.value) == (kind, value)
    assert PendingPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["later", "after", "after:x", "polls:1.5", "manual:3",
                                  "after:-1"])
def test_pending_policy_errors(text: str) -> None:
    with pytest.raises(ValueError):
        PendingPolicy.parse(text)


def _ctx(challenge: str | None = "s3cret", csr: bytes = b"csr-bytes") -> VerifyContext:
    return VerifyContext("tx1", 19, csr, challenge, "CN=x", "CN=x")


def test_static_and_no_challenge() -> None:
    static = StaticChallenge("s3cret")
    assert static.verify(_ctx()).accepted
    assert static.verify(_ctx("nope")) == Verdict(False, "challenge password is wrong")
    assert not static.verify(_ctx(None)).accepted
    assert "s3cret" not in repr(static)
    assert NoChallenge().verify(_ctx(None)).accepted
    with pytest.raises(ValueError):
        StaticChallenge("")


def test_exec_verifier_contract(tmp_path: Path) -> None:
    """micromdm's -csrverifierexec: the CSR on stdin, exit 0 accepts; plus TRANSACTIONID."""
    script = tmp_path / "verify.py"
    script.write_text(
        "import os, sys\n"
        "data = sys.stdin.buffer.read()\n"
        "if data != b'csr-bytes' or os.environ.get('TRANSACTIONID') != 'tx1':\n"
        "    print('unexpected input', file=sys.stderr); sys.exit(3)\n"
        "if os.environ.get('SCEP_MESSAGE_TYPE') != '19': sys.exit(4)\n"
        "print('looks fine')\n")
    verifier = ExecVerifier([sys.executable, str(script)])
    assert verifier.verify(_ctx()) == Verdict(True, f"verifier {sys.executable} accepted: "
                                                    "looks fine")
    refused = verifier.verify(_ctx(csr=b"other"))
    assert not refused.accepted and "exited 3: unexpected input" in refused.reason
    missing = ExecVerifier([str(tmp_path / "nope")]).verify(_ctx())
    assert not missing.accepted and "could not run" in missing.reason
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(slow.stat().st_mode | stat.S_IXUSR)
    timed = ExecVerifier([str(slow)], timeout=0.2).verify(_ctx())
    assert not timed.accepted and "timed out" in timed.reason


def test_function_verifier() -> None:
    assert FunctionVerifier(lambda c: c.challenge == "s3cret").verify(_ctx()).accepted
    assert not FunctionVerifier(lambda c: False).verify(_ctx()).accepted

    def boom(ctx: VerifyContext) -> bool:
        raise RuntimeError("hook broke")

    verdict = FunctionVerifier(boom).verify(_ctx())
    assert not verdict.accepted and "hook broke" in verdict.reason


# --- database -----------------------------------------------------------------------------------

def _insert_pending(db: CADatabase, txid: str) -> None:
    with db.write() as conn:
        db.insert(conn, transaction_id=txid, message_type=19, status=Status.PENDING)


def test_db_operator_actions(tmp_path: Path) -> None:
    db = CADatabase(tmp_path / "ca.db")
    _insert_pending(db, "t1")
    _insert_pending(db, "t2")
    assert db.approve("t1").approved
    assert db.reject("t2", "nope").status is Status.REJECTED
    with pytest.raises(LookupError, match="rejected, not pending"):
        db.approve("t2")
    with pytest.raises(LookupError, match="no request"):
        db.approve("t3")
    with db.write() as conn:
        db.insert(conn, transaction_id="t4", message_type=19, status=Status.ISSUED,
                  serial="0A0B")
    assert db.revoke(0x0A0B).status is Status.REVOKED
    with pytest.raises(LookupError, match="revoked"):
        db.revoke(0x0A0B)
    assert [d.decider for d in db.decisions()] == ["operator", "operator"]
    assert db.revoked()[0][0] == 0x0A0B
    if os.name == "posix":
        assert (tmp_path / "ca.db").exists()


def _racer(path: str, txid: str, n: int) -> None:
    db = CADatabase(Path(path))
    for i in range(n):
        with db.write() as conn:
            db.insert(conn, transaction_id=f"{txid}-{i}", message_type=19,
                      status=Status.ISSUED, serial=f"{txid}{i:04X}".upper())


def test_db_is_safe_across_processes(tmp_path: Path) -> None:
    """Writers in several processes: no lost rows, no duplicate serials (micromdm's file
    depot loses both)."""
    path = tmp_path / "ca.db"
    CADatabase(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_racer, args=(str(path), f"AB{p:02d}", 40)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = CADatabase(path).requests()
    assert len(rows) == 160
    assert len({r.serial for r in rows}) == 160


def test_ca_cert_in_csr_order(lab_ca_template: Path) -> None:
    pem = (lab_ca_template / "ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject.rfc4514_string() == "CN=dmagent Lab Root CA,O=dmagent lab"
    assert oct((lab_ca_template / "ca.key.pem").stat().st_mode & 0o777) == "0o600"
