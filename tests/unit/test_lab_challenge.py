"""Lab dynamic challenges (CertEnrollToken): issue, open, and every way a token is refused."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from lab import pki
from lab.challenge import (
    ChallengeRefused,
    Claims,
    Reason,
    Signer,
    intune_timestamp,
    issue_token,
    new_claims,
    open_token,
    parse_token,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
KEY = bytes(range(32))


@pytest.fixture(scope="module")
def signer() -> Signer:
    key, cert = pki.make_signer(NOW - timedelta(days=1))
    return Signer(key, cert)


def claims(now: datetime = NOW) -> Claims:
    return new_claims(
        device_id="dev-1", profile_id="p-1", unique_id="ModelName_AC_a_LogicalName_b_Hash_1",
        request_id="ModelName=AC_a/LogicalName_b;Version=1;Hash=1",
        subject=(("2.5.4.3", "pc1"),), sans=((3, "pc1.lab.test"),), key_length=2048,
        ekus=("1.3.6.1.5.5.7.3.2",), key_usage=160, now=now)


def _xml(token: str) -> str:
    return base64.b64decode(token).decode()


def _rewrap(token: str, old: str, new: str) -> str:
    xml = _xml(token)
    assert old in xml
    return base64.b64encode(xml.replace(old, new).encode()).decode()


@pytest.mark.parametrize("key", [None, KEY])
def test_round_trip(signer: Signer, key: bytes | None) -> None:
    c = claims()
    token = issue_token(c, signer, encryption_key=key)
    opened = open_token(token, {signer.thumbprint: signer.cert}, now=NOW + timedelta(minutes=59),
                        encryption_key=key)
    assert opened == c


def test_envelope_matches_intune_layout(signer: Signer) -> None:
    c = claims()
    xml = _xml(issue_token(c, signer, encryption_key=KEY))
    assert xml.startswith("<CertEnrollToken><Data><CertEnrollChallenge>")
    assert f"<SignerThumbprint>{signer.thumbprint}</SignerThumbprint></Data><Signature>" in xml
    assert f"<DeviceID>dev-1</DeviceID><CertificateRequestId>{c.request_id}" in xml
    assert "<Timestamp>2026-01-02T03:04:05.1234560Z</Timestamp>" in xml
    assert intune_timestamp(NOW) == "2026-01-02T03:04:05.1234560Z"


def test_encrypted_claims_are_unreadable_plain_are_readable(signer: Signer) -> None:
    enc = parse_token(issue_token(claims(), signer, encryption_key=KEY))
    plain = parse_token(issue_token(claims(), signer))
    assert b"pc1.lab.test" not in enc.blob and enc.blob[:1] == b"E"
    assert b"pc1.lab.test" in plain.blob and plain.blob[:1] == b"P"


def test_rsa_signer_works(signer: Signer) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _, cert = pki.make_signer(NOW)  # any cert: we only need one holding the RSA public key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    name = cert.subject
    rsa_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
                .sign(key, hashes.SHA256()))
    s = Signer(key, rsa_cert)
    token = issue_token(claims(), s)
    assert open_token(token, {s.thumbprint: rsa_cert}, now=NOW).device_id == "dev-1"


def _refusal(token: str, signer: Signer, now: datetime = NOW,
             key: bytes | None = KEY) -> Reason:
    with pytest.raises(ChallengeRefused) as info:
        open_token(token, {signer.thumbprint: signer.cert}, now=now, encryption_key=key)
    return info.value.reason


def test_tampered_blob_is_refused(signer: Signer) -> None:
    token = issue_token(claims(), signer)  # plain: edit the claims themselves
    assert _refusal(_rewrap(token, *_swap_blob(token)), signer) is Reason.BAD_SIGNATURE


def _swap_blob(token: str) -> tuple[str, str]:
    tok = parse_token(token)
    old = base64.b64encode(tok.blob).decode()
    new = base64.b64encode(tok.blob.replace(b"pc1.lab.test", b"evil.lab.tes")).decode()
    return old, new


def test_tampered_signature_is_refused(signer: Signer) -> None:
    token = issue_token(claims(), signer, encryption_key=KEY)
    sig = parse_token(token).signature.hex()
    flipped = sig[:-2] + ("00" if sig[-2:] != "00" else "01")
    assert _refusal(_rewrap(token, sig, flipped), signer) is Reason.BAD_SIGNATURE


def test_outer_device_id_edit_is_refused(signer: Signer) -> None:
    token = issue_token(claims(), signer, encryption_key=KEY)
    edited = _rewrap(token, "<DeviceID>dev-1<", "<DeviceID>dev-2<")
    assert _refusal(edited, signer) is Reason.HEADER_MISMATCH


def test_unknown_signer_is_refused(signer: Signer) -> None:
    other = Signer(*pki.make_signer(NOW))
    assert _refusal(issue_token(claims(), other, encryption_key=KEY), signer) \
        is Reason.UNKNOWN_SIGNER


def test_wrong_encryption_key_is_refused(signer: Signer) -> None:
    token = issue_token(claims(), signer, encryption_key=KEY)
    assert _refusal(token, signer, key=bytes(32)) is Reason.DECRYPT_FAILED
    assert _refusal(token, signer, key=None) is Reason.DECRYPT_FAILED


@pytest.mark.parametrize(("offset", "reason"), [
    (timedelta(minutes=60), Reason.EXPIRED),  # valid for exactly one hour
    (timedelta(days=3), Reason.EXPIRED),
    (timedelta(minutes=-10), Reason.NOT_YET_VALID),
])
def test_validity_window(signer: Signer, offset: timedelta, reason: Reason) -> None:
    token = issue_token(claims(), signer, encryption_key=KEY)
    assert _refusal(token, signer, now=NOW + offset) is reason


@pytest.mark.parametrize(("token", "reason"), [
    ("", Reason.NO_CHALLENGE),
    ("secret", Reason.MALFORMED),  # a static challenge is not a lab token
    (base64.b64encode(b"<nope/>").decode(), Reason.MALFORMED),
    (base64.b64encode(b"not xml").decode(), Reason.MALFORMED),
    (base64.b64encode(b'<!DOCTYPE x [<!ENTITY a "b">]><CertEnrollToken/>').decode(),
     Reason.MALFORMED),
    (base64.b64encode(b"<CertEnrollToken><Data/></CertEnrollToken>").decode(),
     Reason.MALFORMED),
    ("A" * 70000, Reason.MALFORMED),
])
def test_garbage_is_refused_as_malformed(signer: Signer, token: str, reason: Reason) -> None:
    assert _refusal(token, signer) is reason


def test_every_reason_has_an_hresult() -> None:
    for reason in Reason:
        assert reason.hresult & 0x80000000
