"""The SCEP core's certificate reader (`agent.scep.certificate`), held to cryptography's.

Every field the client uses is compared with what cryptography reads from the same DER, over
certificates of every shape the client meets (v1 without extensions, CA and RA key usages, EC
keys, GeneralizedTime after 2049, negative and long serials, unique IDs); malformed input
must be refused with a ValueError, as cryptography refuses it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.scep import ber, der
from agent.scep.certificate import Certificate, as_certificate, names_equal
from tests.scep_support import make_ca, make_cert, make_ndes_like

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_CA_DER = make_ca().cert.public_bytes(DER)


def _built(*, serial: int = 1234, name: str = "Vector", key: object = _RSA,
           not_before: dt.datetime = NOW, not_after: dt.datetime = NOW + dt.timedelta(days=30),
           extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
           version_1: bool = False) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dmagent tests")])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key())  # type: ignore[attr-defined]
               .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(_RSA, hashes.SHA256())
    if version_1:  # cryptography builds v3 only: drop the version and extensions by hand
        return _as_v1(cert)
    return cert


def _as_v1(cert: x509.Certificate) -> x509.Certificate:
    outer = ber.sequence(ber.one_element(cert.public_bytes(DER)), "Certificate")
    tbs = ber.sequence(outer[0], "TBSCertificate")
    fields = [e[4] for e in tbs[1:] if e[0] != 2]  # no version [0], no extensions [3]
    new_tbs = der.seq(*fields)
    signature = _RSA.sign(new_tbs, padding.PKCS1v15(), hashes.SHA256())
    return x509.load_der_x509_certificate(der.seq(new_tbs, outer[1][4], der.bit_string(signature)))


def _key_usage(**bits: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    flags = {n: bits.get(n, False) for n in names}
    if not flags["key_agreement"]:
        flags["encipher_only"] = flags["decipher_only"] = False
    return x509.KeyUsage(**flags)


KU_BITS = {"digital_signature": 0, "content_commitment": 1, "key_encipherment": 2,
           "data_encipherment": 3, "key_agreement": 4, "key_cert_sign": 5, "crl_sign": 6,
           "encipher_only": 7, "decipher_only": 8}

VECTORS: dict[str, Callable[[], x509.Certificate]] = {
    "v3 CA": lambda: make_ca().cert,
    "RA sign": lambda: make_ndes_like()[1].cert,
    "RA encrypt": lambda: make_ndes_like()[2].cert,
    "no key usage": lambda: make_cert("leaf").cert,
    "v1 without extensions": lambda: _built(version_1=True),
    "EC key": lambda: _built(key=_EC),
    "GeneralizedTime after 2049": lambda: _built(
        not_after=dt.datetime(2051, 1, 2, 3, 4, 5, tzinfo=dt.UTC)),
    "UTCTime before 2000": lambda: _built(
        not_before=dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
    "long serial": lambda: _built(serial=(1 << 159) - 1),
    "every key usage": lambda: _built(extensions=((_key_usage(
        **{n: True for n in KU_BITS}), True),)),
    "key agreement + decipher only": lambda: _built(extensions=((_key_usage(
        key_agreement=True, decipher_only=True), False),)),
    "SKI and basicConstraints non-critical": lambda: _built(extensions=(
        (x509.SubjectKeyIdentifier.from_public_key(_RSA.public_key()), False),
        (x509.BasicConstraints(ca=True, path_length=0), False))),
    "basicConstraints cA false": lambda: _built(extensions=(
        (x509.BasicConstraints(ca=False, path_length=None), True),)),
}


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


@pytest.mark.parametrize("name", list(VECTORS))
def test_fields_match_cryptography(name: str) -> None:
    theirs = VECTORS[name]()
    ours = Certificate(theirs.public_bytes(DER))
    assert ours.der == theirs.public_bytes(DER)
    assert ours.serial_number == theirs.serial_number
    assert ours.issuer_der == theirs.issuer.public_bytes()
    assert ours.subject_der == theirs.subject.public_bytes()
    assert ours.not_valid_before_utc == theirs.not_valid_before_utc
    assert ours.not_valid_after_utc == theirs.not_valid_after_utc
    assert ours.spki_der == theirs.public_key().public_bytes(DER, SPKI)
    assert ours.public_key().public_bytes(DER, SPKI) == ours.spki_der
    assert ours.thumbprint == theirs.fingerprint(hashes.SHA1()).hex().upper()
    bc = _ext(theirs, x509.BasicConstraints)
    assert ours.is_ca == (None if bc is None else bc.ca)  # type: ignore[attr-defined]
    ku = _ext(theirs, x509.KeyUsage)
    if ku is None:
        assert ours.key_usage is None
    else:
        set_bits = set()
        for flag, bit in KU_BITS.items():
            try:
                if getattr(ku, flag):
                    set_bits.add(bit)
            except ValueError:  # encipher/decipher_only are undefined without keyAgreement
                pass
        assert ours.key_usage == set_bits
    ski = _ext(theirs, x509.SubjectKeyIdentifier)
    assert ours.subject_key_identifier == (None if ski is None
                                           else ski.digest)  # type: ignore[attr-defined]
    assert {e.oid.dotted_string: e.critical for e in theirs.extensions} == \
        {oid: critical for oid, (critical, _) in ours.extensions.items()}
    assert ours.pem() == theirs.public_bytes(serialization.Encoding.PEM).decode()
    assert ours.to_x509() == theirs
    assert as_certificate(theirs) == ours and as_certificate(ours) is ours
    assert hash(ours) == hash(Certificate(ours.der)) and ours != theirs


def test_subject_and_issuer_read_like_certnametostr() -> None:
    ours = as_certificate(make_ndes_like("Issuing CA")[1].cert)
    assert ours.subject == "CN=NDES RA Sign"
    assert ours.issuer == "CN=Issuing CA"


def test_immutable() -> None:
    ours = as_certificate(make_ca().cert)
    with pytest.raises(AttributeError):
        ours.serial_number = 1  # type: ignore[misc]


def test_names_equal_folds_case_and_string_type() -> None:
    utf8 = der.seq(der.tlv(0x31, der.seq(der.oid("2.5.4.3"), der.utf8_string("Test CA"))))
    printable = der.seq(der.tlv(0x31, der.seq(der.oid("2.5.4.3"),
                                              der.printable_string("test  ca"))))
    other = der.seq(der.tlv(0x31, der.seq(der.oid("2.5.4.3"), der.utf8_string("Other"))))
    assert names_equal(utf8, utf8) and names_equal(utf8, printable)
    assert not names_equal(utf8, other)
    assert not names_equal(utf8, b"\x30\x80garbage")


def _mutations() -> dict[str, bytes]:
    good = _CA_DER
    outer = ber.sequence(ber.one_element(good), "Certificate")
    tbs = ber.sequence(outer[0], "TBSCertificate")

    def with_tbs(fields: list[bytes]) -> bytes:
        return der.seq(der.seq(*fields), outer[1][4], outer[2][4])

    tbs_raw = [e[4] for e in tbs]
    bad_time = list(tbs_raw)
    bad_time[4] = der.seq(der.tlv(0x17, b"261122120000"), der.tlv(0x17, b"261222120000Z"))
    bad_month = list(tbs_raw)
    bad_month[4] = der.seq(der.tlv(0x17, b"261322120000Z"), der.tlv(0x17, b"261222120000Z"))
    no_spki = tbs_raw[:6]
    dup_ext = list(tbs_raw)
    exts = ber.sequence(ber.one_element(tbs[7][3]), "Extensions")
    dup_ext[7] = der.explicit(3, der.seq(*(e[4] for e in exts), exts[0][4]))
    stray = [*tbs_raw, der.tlv(0x04, b"x")]
    return {
        "empty": b"",
        "truncated": good[:-1],
        "trailing bytes": good + b"\x00",
        "not a sequence": b"\x04\x03abc",
        "indefinite length": b"\x30\x80" + outer[0][4] + outer[1][4] + outer[2][4] + b"\0\0",
        "TBS indefinite length": der.seq(b"\x30\x80" + b"".join(tbs_raw) + b"\0\0",
                                         outer[1][4], outer[2][4]),
        "issuer not a Name": with_tbs([*tbs_raw[:3], der.seq(der.tlv(0x31, der.seq(
            der.oid("2.5.4.3")))), *tbs_raw[4:]]),
        "issuer RDN not a SET": with_tbs([*tbs_raw[:3], der.seq(der.seq(der.seq(
            der.oid("2.5.4.3"), der.utf8_string("x")))), *tbs_raw[4:]]),
        "two fields": der.seq(outer[0][4], outer[1][4]),
        "UTCTime without Z": with_tbs(bad_time),
        "month 13": with_tbs(bad_month),
        "TBS incomplete": with_tbs(no_spki),
        "extension twice": with_tbs(dup_ext),
        "stray field after extensions": with_tbs(stray),
        "long-form length where short fits": b"\x30\x81\x03" + good[2:5],
    }

MUTATIONS = _mutations()


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_malformed_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        Certificate(MUTATIONS[name])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_certificates_never_read_differently(data: st.DataObject) -> None:
    """A byte flipped anywhere: we refuse, or read what cryptography reads (where it reads)."""
    good = bytearray(_CA_DER)
    at = data.draw(st.integers(0, len(good) - 1))
    good[at] = data.draw(st.integers(0, 255))
    blob = bytes(good)
    try:
        ours = Certificate(blob)
    except ValueError:
        return
    try:  # cryptography parses some fields only when they are read
        theirs = x509.load_der_x509_certificate(blob)
        fields = (theirs.serial_number, theirs.subject.public_bytes(),
                  theirs.issuer.public_bytes(), theirs.not_valid_after_utc)
    except (ValueError, TypeError, x509.InvalidVersion):  # it also refuses v2, which we read
        return  # we read less than cryptography checks; the store re-checks before installing
    assert (ours.serial_number, ours.subject_der, ours.issuer_der,
            ours.not_valid_after_utc) == fields

