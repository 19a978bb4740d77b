"""agent.scep.cms: SignedData / EnvelopedData round trips, BER tolerance, precise failures."""

from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import core
from cryptography import x509

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.scep import cms as scms
from agent.scep.capabilities import ContentCipher
from agent.scep.certificate import as_certificate
from keystores.base import HashAlg
from tests.scep_support import CryptoKeyHandle, make_ca, make_cert, to_ber

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


# --- EnvelopedData --------------------------------------------------------------------------

@pytest.mark.parametrize("cipher", list(ContentCipher))
@pytest.mark.parametrize("oaep", [None, HashAlg.SHA1, HashAlg.SHA256])
def test_envelope_round_trip(cipher: ContentCipher, oaep: HashAlg | None) -> None:
    rcpt = make_cert("Recipient")
    for size in (0, 1, 15, 16, 17, 1000):
        data = bytes(range(256))[: size % 256] * (size // 256 + 1)
        data = data[:size]
        env = scms.envelope(data, rcpt.cert, cipher, oaep=oaep)
        assert scms.open_envelope(env, rcpt.key, rcpt.cert) == data


@pytest.mark.parametrize("cipher", list(ContentCipher))
def test_envelope_ber_constructed_content(cipher: ContentCipher) -> None:
    rcpt = make_cert("Recipient")
    data = b"certificate bytes " * 40
    ber = to_ber(scms.envelope(data, rcpt.cert, cipher))
    assert b"\x80" in ber[:4]  # really indefinite-length now
    assert scms.open_envelope(ber, rcpt.key, rcpt.cert) == data


def test_envelope_for_someone_else() -> None:
    a, b = make_cert("A"), make_cert("B")
    env = scms.envelope(b"x", a.cert, ContentCipher.AES128)
    with pytest.raises(PeerError) as err:
        scms.open_envelope(env, b.key, b.cert)
    assert err.value.hresult == HResult.CRYPT_E_RECIPIENT_NOT_FOUND


def test_envelope_wrong_key_same_identity() -> None:
    """The recipient id matches but the key is another: the CEK does not decrypt."""
    a = make_cert("A")
    env = scms.envelope(b"secret" * 10, a.cert, ContentCipher.AES128)
    with pytest.raises(PeerError) as err:
        scms.open_envelope(env, CryptoKeyHandle.rsa(), a.cert)
    assert err.value.hresult in (HResult.NTE_BAD_DATA, HResult.NTE_BAD_KEY)


@pytest.mark.parametrize(("cipher", "key", "iv", "ct", "hresult"), [
    (ContentCipher.AES128, b"k" * 15, b"i" * 16, b"c" * 16, HResult.NTE_BAD_KEY),
    (ContentCipher.AES128, b"k" * 16, b"i" * 8, b"c" * 16, HResult.NTE_BAD_DATA),
    (ContentCipher.AES128, b"k" * 16, b"i" * 16, b"c" * 15, HResult.NTE_BAD_DATA),
    (ContentCipher.DES3, b"k" * 24, b"i" * 8, b"", HResult.NTE_BAD_DATA),
])
def test_decrypt_content_rejects(cipher: ContentCipher, key: bytes, iv: bytes, ct: bytes,
                                 hresult: int) -> None:
    with pytest.raises(PeerError) as err:
        scms.decrypt_content(ct, cipher, key, iv)
    assert err.value.hresult == hresult


def test_bad_padding() -> None:
    key, iv = b"k" * 16, b"i" * 16
    ct = scms.encrypt_content(b"x" * 16, ContentCipher.AES128, key, iv)
    bad = ct[:-16] + bytes(b ^ 0x55 for b in ct[-16:])
    with pytest.raises(PeerError, match="invalid padding"):
        scms.decrypt_content(bad, ContentCipher.AES128, key, iv)


def test_single_des_is_triple_des_with_equal_keys() -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    key, iv = bytes.fromhex("0123456789abcdef"), b"\x00" * 8
    ct = scms.encrypt_content(b"12345678", ContentCipher.DES, key, iv)
    dec = Cipher(TripleDES(key * 3), modes.CBC(iv)).decryptor()
    assert (dec.update(ct) + dec.finalize())[:8] == b"12345678"


# --- SignedData -----------------------------------------------------------------------------

def _signed(signer: CryptoKeyHandle, cert: x509.Certificate, content: bytes = b"payload",
            digest: HashAlg = HashAlg.SHA256) -> bytes:
    attrs = [scms.attribute("2.16.840.1.113733.1.9.2", core.PrintableString("3"))]
    return scms.sign_data(content, signer_cert=cert, handle=signer, digest_alg=digest,
                          attributes=attrs, signing_time=NOW)


@pytest.mark.parametrize("digest", list(HashAlg))
def test_sign_verify_round_trip(digest: HashAlg) -> None:
    ca = make_ca()
    signed = _signed(ca.key, ca.cert, digest=digest)
    v = scms.verify_signed_data(signed, [ca.cert])
    assert v.content == b"payload" and v.signer == as_certificate(ca.cert)
    assert v.digest_alg is digest
    assert scms.as_type(v.attributes["2.16.840.1.113733.1.9.2"],
                        core.PrintableString).native == "3"


def test_verify_ber_encoded_message() -> None:
    ca = make_ca()
    signed = _signed(ca.key, ca.cert, content=b"long enough content to be chunked" * 3)
    ber = to_ber(signed)
    assert ber != signed
    assert scms.verify_signed_data(ber, [ca.cert]).content == b"long enough content to be " \
        b"chunked" * 3


def test_signing_time_beyond_2049_is_generalized() -> None:
    ca = make_ca()
    signed = scms.sign_data(b"x", signer_cert=ca.cert, handle=ca.key, digest_alg=HashAlg.SHA256,
                            attributes=[], signing_time=dt.datetime(2051, 1, 1, tzinfo=dt.UTC))
    attrs = scms.verify_signed_data(signed, [ca.cert]).attributes
    assert attrs["1.2.840.113549.1.9.5"].name == "generalized_time"


def test_signer_not_trusted() -> None:
    ca, other = make_ca("CA"), make_ca("Impostor")
    with pytest.raises(PeerError) as err:
        scms.verify_signed_data(_signed(other.key, other.cert), [ca.cert])
    assert err.value.hresult == HResult.CRYPT_E_SIGNER_NOT_FOUND
    assert "Impostor" in err.value.message


def test_impostor_claiming_trusted_identity() -> None:
    """Same issuer/serial as the trusted CA, another key: the signature does not verify."""
    ca = make_ca()
    impostor = CryptoKeyHandle.rsa()
    with pytest.raises(PeerError) as err:
        scms.verify_signed_data(_signed(impostor, ca.cert), [ca.cert])
    assert err.value.hresult == HResult.NTE_BAD_SIGNATURE


def test_tampered_signature() -> None:
    ca = make_ca()
    signed = bytearray(_signed(ca.key, ca.cert))
    signed[-10] ^= 0x01  # inside the signature value, the last field
    with pytest.raises(PeerError) as err:
        scms.verify_signed_data(bytes(signed), [ca.cert])
    assert err.value.hresult == HResult.NTE_BAD_SIGNATURE


def test_content_changed_after_signing() -> None:
    ca = make_ca()
    signed = _signed(ca.key, ca.cert, content=b"ORIGINAL-CONTENT")
    tampered = signed.replace(b"ORIGINAL-CONTENT", b"TAMPERED-CONTENT")
    with pytest.raises(PeerError) as err:
        scms.verify_signed_data(tampered, [ca.cert])
    assert err.value.hresult == HResult.CRYPT_E_HASH_VALUE


@pytest.mark.parametrize(("body", "hresult"), [
    (b"", HResult.CRYPT_E_ASN1_EOD),
    (b"<html>500</html>", HResult.CRYPT_E_ASN1_BADTAG),
    (b"\x30\x82\x05\x00\x06\x09", HResult.CRYPT_E_ASN1_EOD),
    (b"\x30\x03\x02\x01\x01", HResult.CRYPT_E_ASN1_BADTAG),
])
def test_malformed(body: bytes, hresult: int) -> None:
    ca = make_ca()
    with pytest.raises(PeerError) as err:
        scms.verify_signed_data(body, [ca.cert])
    assert err.value.hresult == hresult


def test_truncated_real_message() -> None:
    ca = make_ca()
    signed = _signed(ca.key, ca.cert)
    for cut in (len(signed) // 3, len(signed) - 1):
        with pytest.raises(PeerError) as err:
            scms.verify_signed_data(signed[:cut], [ca.cert])
        assert err.value.hresult == HResult.CRYPT_E_ASN1_EOD


def test_enveloped_where_signed_expected() -> None:
    ca = make_ca()
    env = scms.envelope(b"x", ca.cert, ContentCipher.AES128)
    with pytest.raises(PeerError) as err:
        scms.verify_signed_data(env, [ca.cert])
    assert err.value.hresult == HResult.CRYPT_E_INVALID_MSG_TYPE


def test_degenerate_round_trip() -> None:
    ca = make_ca()
    leaf = make_cert("leaf", issuer=ca)
    certs, crls = scms.certs_from_degenerate(scms.degenerate_certs_only([leaf.cert, ca.cert]),
                                             "reply")
    assert certs == [as_certificate(leaf.cert), as_certificate(ca.cert)] and crls == []
    certs, _ = scms.certs_from_degenerate(to_ber(scms.degenerate_certs_only([leaf.cert])),
                                          "reply")
    assert certs == [as_certificate(leaf.cert)]


@pytest.mark.parametrize(("method", "contents", "expected"), [
    (0, b"abc", b"abc"),
    (1, bytes.fromhex("0402616204016300"), None),  # a trailing non-OCTET STRING byte pair
])
def test_ber_octets(method: int, contents: bytes, expected: bytes | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            scms.ber_octets(method, contents + b"\x05\x00")
    else:
        assert scms.ber_octets(method, contents) == expected


def test_ber_octets_nested_chunks() -> None:
    inner = bytes.fromhex("2480" "040161" "040162" "0000")  # constructed in constructed
    assert scms.ber_octets(1, inner + bytes.fromhex("040163")) == b"abc"


# --- reading: identifiers and algorithms the builders above never write ---------------------

def _envelope_to(rid: bytes, cert: x509.Certificate, data: bytes, *,
                 kea: bytes | None = None, cipher_oid: str = "2.16.840.1.101.3.4.1.2",
                 others: bytes = b"") -> bytes:
    """An EnvelopedData with a chosen RecipientIdentifier / algorithms (RFC 5652 §6)."""
    import os

    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from agent.scep import der

    key, iv = os.urandom(16), os.urandom(16)
    ciphertext = scms.encrypt_content(data, ContentCipher.AES128, key, iv)
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    ktri = der.seq(der.integer(2), rid, kea or der.algorithm(scms.OID_RSA_ENCRYPTION),
                   der.octet_string(public.encrypt(key, padding.PKCS1v15())))
    eci = der.seq(der.oid(scms.OID_DATA), der.algorithm(cipher_oid, der.octet_string(iv)),
                  der.tlv(0x80, ciphertext))
    body = der.seq(der.integer(2), der.tlv(0x31, others + ktri), eci)
    return der.seq(der.oid(scms.OID_ENVELOPED_DATA), der.explicit(0, body))


def _with_ski() -> tuple[x509.Certificate, CryptoKeyHandle, bytes]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = CryptoKeyHandle.rsa()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SKI recipient")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(ski, critical=False).sign(key.key, hashes.SHA256()))
    return cert, key, ski.digest


def test_recipient_named_by_subject_key_identifier() -> None:
    from agent.scep import der

    cert, key, ski = _with_ski()
    kari = der.tlv(0xA1, der.integer(3))  # another RecipientInfo kind first: skipped
    env = _envelope_to(der.tlv(0x80, ski), cert, b"by key id", others=kari)
    assert scms.open_envelope(env, key, cert) == b"by key id"
    other = _envelope_to(der.tlv(0x80, b"\x01" * 20), cert, b"x")
    with pytest.raises(PeerError) as err:
        scms.open_envelope(other, key, cert)
    assert err.value.hresult == HResult.CRYPT_E_RECIPIENT_NOT_FOUND


def test_issuer_encoded_otherwise_still_names_the_certificate() -> None:
    """RFC 5280 §7.1: another string type and case in the issuer is the same name."""
    from agent.scep import der

    ca = make_ca("Test SCEP CA")  # cryptography writes UTF8String
    issuer = ca.cert.issuer.public_bytes()
    assert b"\x0c\x0cTest SCEP CA" in issuer
    folded = issuer.replace(b"\x0c\x0cTest SCEP CA", b"\x13\x0ctest scep ca")
    rid = der.seq(folded, der.integer(ca.cert.serial_number))
    assert scms.open_envelope(_envelope_to(rid, ca.cert, b"folded"), ca.key, ca.cert) == \
        b"folded"
    signed = _signed(ca.key, ca.cert)
    at = signed.rfind(issuer)  # the SignerInfo's sid comes after the certificate
    assert scms.verify_signed_data(signed[:at] + folded + signed[at + len(issuer):],
                                   [ca.cert]).signer == as_certificate(ca.cert)


@pytest.mark.parametrize(("kea", "text"), [
    ("oaep-sha256-mgf1-sha1", "MGF1 must use the OAEP hash"),
    ("oaep-sha224", "RSAES-OAEP with sha224 is not supported"),
    ("rsa-kem", "key transport 1.2.840.113549.1.9.16.3.14 (1.2.840.113549.1.9.16.3.14) is "
                "not supported"),
    ("aes-gcm", "content encryption 2.16.840.1.101.3.4.1.6 (aes128_gcm) is not supported"),
])
def test_unsupported_algorithms_are_named(kea: str, text: str) -> None:
    from agent.scep import der

    rcpt = make_cert("Recipient")
    sha1, sha224, sha256 = (der.algorithm(o) for o in (
        "1.3.14.3.2.26", "2.16.840.1.101.3.4.2.4", "2.16.840.1.101.3.4.2.1"))

    def mgf(hash_alg: bytes) -> bytes:
        return der.explicit(1, der.seq(der.oid(scms.OID_MGF1), hash_alg))

    algs = {"oaep-sha256-mgf1-sha1": der.algorithm(scms.OID_RSAES_OAEP, der.seq(
                der.explicit(0, sha256), mgf(sha1))),
            "oaep-sha224": der.algorithm(scms.OID_RSAES_OAEP, der.seq(
                der.explicit(0, sha224), mgf(sha224))),
            "rsa-kem": der.algorithm("1.2.840.113549.1.9.16.3.14"), "aes-gcm": None}
    rid = der.seq(rcpt.cert.issuer.public_bytes(), der.integer(rcpt.cert.serial_number))
    cipher_oid = "2.16.840.1.101.3.4.1.6" if kea == "aes-gcm" else "2.16.840.1.101.3.4.1.2"
    env = _envelope_to(rid, rcpt.cert, b"x", kea=algs[kea], cipher_oid=cipher_oid)
    with pytest.raises(PeerError) as err:
        scms.open_envelope(env, rcpt.key, rcpt.cert)
    assert err.value.hresult == HResult.CRYPT_E_UNKNOWN_ALGO
    assert text in err.value.message


def test_attributes_for_asn1crypto_users_and_raw_for_the_client() -> None:
    ca = make_ca()
    v = scms.verify_signed_data(_signed(ca.key, ca.cert), [ca.cert])
    assert v.raw_attributes["2.16.840.1.113733.1.9.2"][3] == b"3"  # PrintableString "3"
    assert isinstance(v.attributes["1.2.840.113549.1.9.4"], core.OctetString)  # typed
    assert set(v.attributes) == set(v.raw_attributes)


def test_the_client_path_imports_no_asn1crypto() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys, agent.scep.enroll, agent.scep.messages, agent.scep.cmsread; "
            "print([m for m in sys.modules if m.startswith('asn1crypto')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.strip()
    assert out == "[]"
