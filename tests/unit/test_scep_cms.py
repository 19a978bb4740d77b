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
    assert v.content == b"payload" and v.signer == ca.cert and v.digest_alg is digest
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
    assert certs == [leaf.cert, ca.cert] and crls == []
    certs, _ = scms.certs_from_degenerate(to_ber(scms.degenerate_certs_only([leaf.cert])),
                                          "reply")
    assert certs == [leaf.cert]


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
