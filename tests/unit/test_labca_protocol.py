"""The lab CA's SCEP message layer and decisions, in process (no HTTP): each message type and
each failInfo, with requests built and replies checked by the agent's own SCEP code."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.csr import CsrRequest, build_csr
from agent.diagnostics import FailInfo, HResult
from agent.scep import messages as m
from agent.scep.capabilities import Algorithms, ContentCipher
from agent.scep.certificate import as_certificate
from agent.scep.errors import ScepFailure
from keystores.base import HashAlg
from lab.scepca import protocol as proto
from lab.scepca.ca import CertificateAuthority
from lab.scepca.config import CAConfig, Mode, PendingPolicy
from lab.scepca.db import CADatabase, Status
from lab.scepca.policy import StaticChallenge
from lab.scepca.service import ScepService
from lab.scepca.testing import copy_ca
from tests.scep_support import CryptoKeyHandle, make_cert

AES = Algorithms(ContentCipher.AES128, HashAlg.SHA256, True)
DES3_SHA1 = Algorithms(ContentCipher.DES3, HashAlg.SHA1, True)


@pytest.fixture(scope="module")
def keys() -> list[CryptoKeyHandle]:
    return [CryptoKeyHandle.rsa() for _ in range(4)]


@dataclass
class Env:
    service: ScepService
    ca: CertificateAuthority
    keys: list[CryptoKeyHandle]

    @property
    def recipient(self) -> x509.Certificate:
        return self.service.decrypters[0][0]

    @property
    def trusted(self) -> list[x509.Certificate]:
        return [self.service.signer.cert]

    def now(self) -> datetime:
        return datetime.now(UTC)

    def csr(self, key: CryptoKeyHandle, challenge: str = "secret", **kw: Any) -> bytes:
        return build_csr(CsrRequest(subject=kw.pop("subject", "CN=device-1"),
                                    challenge=challenge, **kw), key)

    def pkcs_req(self, key: CryptoKeyHandle, challenge: str = "secret",
                 algs: Algorithms = AES, now: datetime | None = None,
                 **kw: Any) -> m.PendingRequest:
        return m.pkcs_req(self.csr(key, challenge, **kw), handle=key, recipient=self.recipient,
                          algorithms=algs, now=now or self.now())

    def send(self, request: m.PendingRequest, key: CryptoKeyHandle,
             expected: CryptoKeyHandle | None = None) -> m.CertRep:
        reply = self.service.pki_operation(request.der)
        assert reply.status_code == 200, reply.body
        return m.parse_cert_rep(reply.body, request, trusted=self.trusted, handle=key,
                                expected_key=expected.public_key() if expected else None)

    def enroll(self, key: CryptoKeyHandle, **kw: Any) -> x509.Certificate:
        rep = self.send(self.pkcs_req(key, **kw), key, key)
        assert rep.status is m.PkiStatus.SUCCESS and rep.issued is not None
        return rep.issued.to_x509()


@pytest.fixture
def make_env(tmp_path: Path, lab_ca_template: Path,
             keys: list[CryptoKeyHandle]) -> Callable[..., Env]:
    def make(**overrides: Any) -> Env:
        directory = tmp_path / f"ca{len(list(tmp_path.iterdir()))}"
        copy_ca(lab_ca_template, directory)
        ca = CertificateAuthority.load(directory)
        config = replace(CAConfig(verifier=StaticChallenge("secret")), **overrides)
        return Env(ScepService(ca, CADatabase(ca.db_path), config), ca, keys)
    return make


# --- each message type, answered SUCCESS / PENDING ------------------------------------------

def test_pkcsreq_issues_what_the_csr_asks(make_env: Callable[..., Env]) -> None:
    env = make_env()
    key = env.keys[0]
    cert = env.enroll(key, subject="CN=device-1, O=Contoso",
                      subject_alt_names="3+device-1.contoso.test;2+user@contoso.test",
                      eku="1.3.6.1.5.5.7.3.2+1.3.6.1.5.5.7.3.1", key_usage=0xA0)
    assert cert.subject.rfc4514_string() == "O=Contoso,CN=device-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["device-1.contoso.test"]
    assert san.get_values_for_type(x509.RFC822Name) == ["user@contoso.test"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert cert.issuer == env.ca.cert.subject
    cert.verify_directly_issued_by(env.ca.cert)
    (row,) = env.service.db.requests()
    assert row.status is Status.ISSUED and row.serial == f"{cert.serial_number:X}".zfill(
        len(row.serial or ""))
    assert row.requester == "O=Contoso,CN=device-1"  # the transient cert: the CSR subject


def test_template_defaults_and_validity_request(make_env: Callable[..., Env]) -> None:
    env = make_env(validity_days=30, max_validity_days=400)
    # No EKU/KU in the CSR: the template's clientAuth + digitalSignature|keyEncipherment.
    plain = env.enroll(env.keys[0])
    assert list(plain.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    life = plain.not_valid_after_utc - plain.not_valid_before_utc
    assert timedelta(days=30) <= life <= timedelta(days=30, minutes=2)
    # ValidPeriod=Years/2 asks for 730 days: capped at max_validity_days.
    asked = env.enroll(env.keys[1], valid_period="Years", valid_period_units=2)
    life = asked.not_valid_after_utc - asked.not_valid_before_utc
    assert timedelta(days=400) <= life <= timedelta(days=400, minutes=2)
    short = env.enroll(env.keys[2], valid_period="Days", valid_period_units=10)
    assert (short.not_valid_after_utc - short.not_valid_before_utc) < timedelta(days=11)


def test_pending_manual_then_certpoll(make_env: Callable[..., Env]) -> None:
    env = make_env(pending=PendingPolicy.parse("manual"))
    key = env.keys[0]
    req = env.pkcs_req(key)
    assert env.send(req, key, key).status is m.PkiStatus.PENDING
    poll = m.cert_poll(req, handle=key, ca_cert=env.ca.cert, recipient=env.recipient,
                       now=env.now())
    assert env.send(poll, key, key).status is m.PkiStatus.PENDING
    pending = env.service.db.get(req.transaction_id)
    assert pending is not None and pending.csr is not None
    assert oct(env.service.db.path.stat().st_mode & 0o777) == "0o600"
    env.service.db.approve(req.transaction_id)
    poll = m.cert_poll(req, handle=key, ca_cert=env.ca.cert, recipient=env.recipient,
                       now=env.now())
    rep = env.send(poll, key, key)
    assert rep.status is m.PkiStatus.SUCCESS and rep.issued is not None
    (row,) = env.service.db.requests()
    assert row.status is Status.ISSUED and row.polls == 2 and row.approved
    assert row.csr is None  # kept only while pending: it holds the challenge password
    deciders = [d.decider for d in env.service.db.decisions(req.transaction_id)]
    assert deciders == ["static", "operator"]


@pytest.mark.parametrize(("policy", "polls_pending"), [("polls:2", 1), ("polls:1", 0),
                                                       ("after:0", 0)])
def test_pending_timed_approval(make_env: Callable[..., Env], policy: str,
                                polls_pending: int) -> None:
    env = make_env(pending=PendingPolicy.parse(policy))
    key = env.keys[0]
    req = env.pkcs_req(key)
    assert env.send(req, key, key).status is m.PkiStatus.PENDING
    statuses = []
    for _ in range(polls_pending + 1):
        poll = m.cert_poll(req, handle=key, ca_cert=env.ca.cert, recipient=env.recipient,
                           now=env.now())
        statuses.append(env.send(poll, key, key).status)
    assert statuses == [m.PkiStatus.PENDING] * polls_pending + [m.PkiStatus.SUCCESS]
    assert [d.decider for d in env.service.db.decisions()] == ["static", "timer"]


def test_retransmitted_pkcsreq_returns_the_same_certificate(make_env: Callable[..., Env]
                                                            ) -> None:
    env = make_env()
    key = env.keys[0]
    req = env.pkcs_req(key)
    first = env.send(req, key, key).issued
    again = env.send(req, key, key).issued  # the very same message, resent
    assert first is not None and again is not None
    assert first.serial_number == again.serial_number
    assert len(env.service.db.requests()) == 1


def test_renewalreq_signed_by_an_issued_certificate(make_env: Callable[..., Env]) -> None:
    env = make_env()
    old_key, new_key = env.keys[0], env.keys[1]
    old = env.enroll(old_key)
    csr = env.csr(new_key, challenge="")  # no challenge: the certificate authenticates
    req = m.renewal_req(csr, old_handle=old_key, old_cert=old, recipient=env.recipient,
                        algorithms=AES, now=env.now())
    rep = env.send(req, old_key, new_key)
    assert rep.issued is not None and rep.issued.serial_number != old.serial_number
    rows = env.service.db.requests()
    assert [(r.message_type, r.status) for r in rows] == [(19, Status.ISSUED),
                                                          (17, Status.ISSUED)]
    assert env.service.db.decisions()[-1].decider == "renewal"


def test_pkcsreq_signed_by_issued_certificate_needs_no_challenge(
        make_env: Callable[..., Env]) -> None:
    """NDES: "either a password … or signed with a valid signing certificate"."""
    env = make_env()
    old = env.enroll(env.keys[0])
    csr = env.csr(env.keys[1], challenge="")
    req = m.renewal_req(csr, old_handle=env.keys[0], old_cert=old, recipient=env.recipient,
                        algorithms=AES, now=env.now(), message_type=m.MessageType.PKCS_REQ)
    assert env.send(req, env.keys[0], env.keys[1]).issued is not None


def test_getcert_and_getcrl(make_env: Callable[..., Env]) -> None:
    env = make_env()
    key = env.keys[0]
    cert = env.enroll(key)
    other = env.enroll(env.keys[1], subject="CN=device-2")
    env.service.db.revoke(other.serial_number)
    req = m.get_cert(env.ca.cert.subject, cert.serial_number, handle=key, signer_cert=cert,
                     recipient=env.recipient, algorithms=AES, now=env.now())
    rep = env.send(req, key)
    assert [c.serial_number for c in rep.certificates] == [cert.serial_number]
    req = m.get_crl(env.ca.cert.subject, cert.serial_number, handle=key, signer_cert=cert,
                    recipient=env.recipient, algorithms=AES, now=env.now())
    (crl_der,) = env.send(req, key).crls
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.is_signature_valid(env.ca.cert.public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in crl] == [other.serial_number]


@pytest.mark.parametrize("mode", [Mode.NORMAL, Mode.NDES])
def test_roles_per_mode(make_env: Callable[..., Env], mode: Mode) -> None:
    """NDES: requests are encrypted to the RA encryption certificate, CertReps signed by the
    RA signing one and carry the CA with the issued certificate."""
    env = make_env(mode=mode)
    algs = DES3_SHA1 if mode is Mode.NDES else AES
    key = env.keys[0]
    rep = env.send(env.pkcs_req(key, algs=algs), key, key)
    want_signer = env.ca.ra_sign.cert if mode is Mode.NDES else env.ca.cert
    assert rep.signer == as_certificate(want_signer)
    assert rep.digest_alg is algs.digest
    assert len(rep.certificates) == (2 if mode is Mode.NDES else 1)
    ctype, body = proto.ca_cert_reply(env.ca.cert, [env.ca.ra_sign.cert, env.ca.ra_enc.cert]
                                      if mode is Mode.NDES else [])
    assert env.service.get_ca_cert().content_type == ctype
    assert env.service.get_ca_cert().body == body


# --- each failInfo -----------------------------------------------------------------------------

def _tamper_signature(der: bytes) -> bytes:
    info = cms.ContentInfo.load(der)
    si = info["content"]["signer_infos"][0]
    sig = bytearray(si["signature"].native)
    sig[-1] ^= 0xFF
    si["signature"] = bytes(sig)
    return bytes(info.dump(force=True))


def _foreign_envelope(env: Env, key: CryptoKeyHandle) -> m.PendingRequest:
    stranger = make_cert("Some other CA", ca=True)
    return m.pkcs_req(env.csr(key), handle=key, recipient=stranger.cert, algorithms=AES,
                      now=env.now())


@dataclass(frozen=True)
class FailCase:
    name: str
    fail_info: FailInfo
    build: Callable[[Env], tuple[bytes, m.PendingRequest, CryptoKeyHandle]]
    config: tuple[tuple[str, Any], ...] = ()
    text: str = ""


def _plain(req_fn: Callable[[Env, CryptoKeyHandle], m.PendingRequest]
           ) -> Callable[[Env], tuple[bytes, m.PendingRequest, CryptoKeyHandle]]:
    def build(env: Env) -> tuple[bytes, m.PendingRequest, CryptoKeyHandle]:
        key = env.keys[0]
        req = req_fn(env, key)
        return req.der, req, key
    return build


def _tampered(env: Env) -> tuple[bytes, m.PendingRequest, CryptoKeyHandle]:
    req = env.pkcs_req(env.keys[0])
    return _tamper_signature(req.der), req, env.keys[0]


def _renewal_by_stranger(env: Env, key: CryptoKeyHandle) -> m.PendingRequest:
    stranger_ca = make_cert("Stranger CA", ca=True)
    foreign = make_cert("device-1", issuer=stranger_ca, key=key)
    return m.renewal_req(env.csr(env.keys[1], challenge=""), old_handle=key,
                         old_cert=foreign.cert, recipient=env.recipient, algorithms=AES,
                         now=env.now())


def _getcert_unknown(env: Env, key: CryptoKeyHandle) -> m.PendingRequest:
    signer = make_cert("device-1", key=key)
    return m.get_cert(env.ca.cert.subject, 0x1234, handle=key, signer_cert=signer.cert,
                      recipient=env.recipient, algorithms=AES, now=env.now())


def _getcrl_wrong_issuer(env: Env, key: CryptoKeyHandle) -> m.PendingRequest:
    signer = make_cert("device-1", key=key)
    return m.get_crl(signer.cert.subject, 1, handle=key, signer_cert=signer.cert,
                     recipient=env.recipient, algorithms=AES, now=env.now())


def _poll_unknown(env: Env, key: CryptoKeyHandle) -> m.PendingRequest:
    never_sent = env.pkcs_req(key)
    return m.cert_poll(never_sent, handle=key, ca_cert=env.ca.cert, recipient=env.recipient,
                       now=env.now())


FAIL_CASES = [
    FailCase("aes-against-ndes-caps", FailInfo.BAD_ALG,
             _plain(lambda e, k: e.pkcs_req(k, algs=Algorithms(ContentCipher.AES128,
                                                               HashAlg.SHA1, True))),
             (("mode", Mode.NDES),), "content cipher aes128-cbc"),
    FailCase("sha256-against-ndes-caps", FailInfo.BAD_ALG,
             _plain(lambda e, k: e.pkcs_req(k, algs=Algorithms(ContentCipher.DES3,
                                                               HashAlg.SHA256, True))),
             (("mode", Mode.NDES),), "digest sha256"),
    FailCase("des-with-enforced-caps", FailInfo.BAD_ALG,
             _plain(lambda e, k: e.pkcs_req(k, algs=Algorithms(ContentCipher.DES,
                                                               HashAlg.SHA256, True))),
             (("enforce_caps", True),), "des-cbc"),
    FailCase("tampered-signature", FailInfo.BAD_MESSAGE_CHECK, _tampered, (),
             "signature check failed"),
    FailCase("envelope-for-another-ca", FailInfo.BAD_MESSAGE_CHECK,
             _plain(_foreign_envelope), (), "not encrypted to this CA"),
    FailCase("wrong-challenge", FailInfo.BAD_REQUEST,
             _plain(lambda e, k: e.pkcs_req(k, challenge="guess")), (),
             "challenge password is wrong"),
    FailCase("no-challenge", FailInfo.BAD_REQUEST,
             _plain(lambda e, k: e.pkcs_req(k, challenge="")), (),
             "no challengePassword"),
    FailCase("renewal-by-foreign-cert", FailInfo.BAD_REQUEST, _plain(_renewal_by_stranger),
             (), "which this CA did not issue"),
    FailCase("small-key", FailInfo.BAD_REQUEST, _plain(lambda e, k: e.pkcs_req(k)),
             (("min_key_size", 3072),), "below this CA's minimum"),
    FailCase("client-clock-two-days-behind", FailInfo.BAD_TIME,
             _plain(lambda e, k: e.pkcs_req(k, now=e.now() - timedelta(days=2))), (),
             "away from the CA's clock"),
    FailCase("ca-clock-ahead", FailInfo.BAD_TIME, _plain(lambda e, k: e.pkcs_req(k)),
             (("clock_offset", 7200.0), ("max_clock_skew", 600.0)), "signingTime"),
    FailCase("getcert-unknown-serial", FailInfo.BAD_CERT_ID, _plain(_getcert_unknown), (),
             "no certificate with serial 1234"),
    FailCase("getcrl-other-issuer", FailInfo.BAD_CERT_ID, _plain(_getcrl_wrong_issuer), (),
             "is not this CA"),
    FailCase("certpoll-unknown-transaction", FailInfo.BAD_CERT_ID, _plain(_poll_unknown), (),
             "no request with transaction id"),
]


@pytest.mark.parametrize("case", FAIL_CASES, ids=[c.name for c in FAIL_CASES])
def test_failinfo(make_env: Callable[..., Env], case: FailCase) -> None:
    env = make_env(**dict(case.config))
    der, req, key = case.build(env)
    reply = env.service.pki_operation(der)
    assert reply.status_code == 200
    assert reply.fail_info is case.fail_info, reply.text
    with pytest.raises(ScepFailure) as err:
        m.parse_cert_rep(reply.body, req, trusted=env.trusted, handle=key)
    assert err.value.fail_info is case.fail_info
    assert err.value.hresult == case.fail_info.hresult
    assert case.text in err.value.fail_text
    assert not any(r.status is Status.ISSUED for r in env.service.db.requests())
    if req.message_type in (m.MessageType.PKCS_REQ, m.MessageType.RENEWAL_REQ):
        (row,) = env.service.db.requests()
        assert row.status is Status.REJECTED and case.text in row.reason
        assert row.csr is None


def test_certpoll_for_a_rejected_request_is_badrequest(make_env: Callable[..., Env]) -> None:
    env = make_env(pending=PendingPolicy.parse("manual"))
    key = env.keys[0]
    req = env.pkcs_req(key)
    assert env.send(req, key).status is m.PkiStatus.PENDING
    env.service.db.reject(req.transaction_id, "not today")
    poll = m.cert_poll(req, handle=key, ca_cert=env.ca.cert, recipient=env.recipient,
                       now=env.now())
    with pytest.raises(ScepFailure) as err:
        env.send(poll, key)
    assert err.value.fail_info is FailInfo.BAD_REQUEST and "not today" in err.value.fail_text
    assert err.value.hresult == HResult.E_ACCESSDENIED


def test_renewal_refused_when_disabled(make_env: Callable[..., Env]) -> None:
    env = make_env(allow_renewal=False)
    old = env.enroll(env.keys[0])
    req = m.renewal_req(env.csr(env.keys[1], challenge=""), old_handle=env.keys[0],
                        old_cert=old, recipient=env.recipient, algorithms=AES, now=env.now())
    with pytest.raises(ScepFailure) as err:
        env.send(req, env.keys[0])
    assert err.value.fail_info is FailInfo.BAD_REQUEST


# --- not answerable at all: HTTP 400 -------------------------------------------------------------

def _without_attribute(der: bytes, oid: str) -> bytes:
    info = cms.ContentInfo.load(der)
    si = info["content"]["signer_infos"][0]
    si["signed_attrs"] = cms.CMSAttributes([a for a in si["signed_attrs"]
                                            if a["type"].dotted != oid])
    return bytes(info.dump(force=True))


@pytest.mark.parametrize(("name", "mangle", "text"), [
    ("garbage", lambda der: b"\x00garbage", "not a CMS message"),
    ("empty", lambda der: b"", "not a CMS message"),
    ("truncated", lambda der: der[: len(der) // 2], "not a CMS message"),
    ("no-transaction-id", lambda der: _without_attribute(der, m.OID_TRANSACTION_ID),
     "transactionID"),
    ("no-sender-nonce", lambda der: _without_attribute(der, m.OID_SENDER_NONCE),
     "senderNonce"),
    ("no-message-type", lambda der: _without_attribute(der, m.OID_MESSAGE_TYPE),
     "messageType"),
])
def test_malformed_requests_get_http_400(make_env: Callable[..., Env], name: str,
                                         mangle: Callable[[bytes], bytes], text: str) -> None:
    env = make_env()
    reply = env.service.pki_operation(mangle(env.pkcs_req(env.keys[0]).der))
    assert reply.status_code == 400 and text in reply.text
    assert env.service.db.requests() == []


def test_failure_certrep_has_no_content_and_pending_too(make_env: Callable[..., Env]) -> None:
    """RFC 8894 §3.3.2: FAILURE and PENDING carry no pkcsPKIEnvelope."""
    env = make_env(pending=PendingPolicy.parse("manual"))
    for challenge in ("guess", "secret"):
        reply = env.service.pki_operation(env.pkcs_req(env.keys[0], challenge=challenge).der)
        signed = cms.ContentInfo.load(reply.body)["content"]
        assert signed["encap_content_info"]["content"].native is None
        assert reply.pki_status in (m.PkiStatus.FAILURE, m.PkiStatus.PENDING)


def test_getcacaps_per_mode(make_env: Callable[..., Env]) -> None:
    assert make_env(mode=Mode.NDES).service.get_ca_caps().body == \
        b"POSTPKIOperation\nRenewal\nSHA-1\nDES3\n"
    normal = make_env().service.get_ca_caps().body.decode().split()
    assert {"AES", "SHA-256", "POSTPKIOperation", "Renewal", "SCEPStandard"} <= set(normal)
    custom = make_env(caps=("DES3", "SHA-1")).service.get_ca_caps().body
    assert custom == b"DES3\nSHA-1\n"


def test_ca_files_round_trip(lab_ca_template: Path) -> None:
    ca = CertificateAuthority.load(lab_ca_template)
    for pair, usage in ((ca.ra_sign, "digital_signature"), (ca.ra_enc, "key_encipherment")):
        ku = pair.cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert getattr(ku, usage)
        pair.cert.verify_directly_issued_by(ca.cert)
    assert ca.ra_sign.cert.subject == ca.ra_enc.cert.subject  # NDES: one name, two usages
    pem = (lab_ca_template / "ca.pem").read_bytes()
    assert x509.load_pem_x509_certificate(pem) == ca.cert
    assert ca.thumbprint == base64.b16encode(
        __import__("hashlib").sha1(ca.cert.public_bytes(serialization.Encoding.DER))
        .digest()).decode()
