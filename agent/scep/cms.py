"""The CMS layer SCEP needs (RFC 5652 as profiled by RFC 8894 §3): building, and the shared
helpers of `agent.scep.cmsread` (verifying and opening replies), whose functions are
re-exported here.

Sans-IO: bytes and key handles in, bytes and verified objects out. `cryptography` cannot add
SCEP's signed attributes nor sign through a key handle (a TPM key never leaves the TPM), so the
structures are assembled from DER pieces (`agent.scep.der`), signatures are made by
`KeyHandle.sign`, decryption of the content-encryption key by `KeyHandle.decrypt`, and
`cryptography` does the symmetric ciphers and the verification of the CA's signature.
asn1crypto is imported only by the helpers for callers that work with its objects
(`load_content_info`, `attribute`, `as_type`, ...), such as the lab CA.

Parsing is tolerant of BER (indefinite lengths, constructed OCTET STRINGs), as Go SCEP servers
send it, and strict about everything that matters: every failure is a `PeerError` carrying
the CryptoAPI HRESULT Windows would report (CRYPT_E_*, NTE_*) and a message naming the fault.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.scep import der
from agent.scep.ber import ber_elements, ber_octets, ber_to_der_lengths
from agent.scep.capabilities import ContentCipher
from agent.scep.certificate import as_certificate
from keystores.base import HashAlg, KeyHandle

if TYPE_CHECKING:
    from asn1crypto import cms, core
    from asn1crypto import x509 as ax509

    from agent.scep.certificate import CertificateLike
    from agent.scep.cmsread import (
        VerifiedSignedData,
        certs_from_degenerate,
        open_envelope,
        verify_signed_data,
    )

__all__ = ["VerifiedSignedData", "ber_elements", "ber_octets", "ber_to_der_lengths",
           "certs_from_degenerate", "open_envelope", "verify_signed_data"]
_READERS = frozenset({"VerifiedSignedData", "certs_from_degenerate", "open_envelope",
                      "verify_signed_data"})


def __getattr__(name: str) -> Any:
    """The reading side lives in `agent.scep.cmsread` (PEP 562: imported on first use)."""
    if name in _READERS:
        from agent.scep import cmsread

        return getattr(cmsread, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RandomBytes = Callable[[int], bytes]

# asn1crypto's digest names (signature_algorithm_for builds its objects by name).
_DIGEST_NAMES: dict[HashAlg, str] = {HashAlg.SHA1: "sha1", HashAlg.SHA256: "sha256",
                                     HashAlg.SHA384: "sha384", HashAlg.SHA512: "sha512"}
_HASHES: dict[HashAlg, Callable[[], hashes.HashAlgorithm]] = {
    HashAlg.SHA1: hashes.SHA1, HashAlg.SHA256: hashes.SHA256,
    HashAlg.SHA384: hashes.SHA384, HashAlg.SHA512: hashes.SHA512}


def digest(data: bytes, alg: HashAlg) -> bytes:
    h = hashes.Hash(_HASHES[alg]())  # cryptography's (hashlib would load a 2nd libcrypto)
    h.update(data)
    return h.finalize()


# --- error mapping --------------------------------------------------------------------------

@contextmanager
def asn1_errors(what: str) -> Iterator[None]:
    """Turn asn1crypto's lazy-parsing exceptions into a PeerError naming `what`.

    asn1crypto parses on first access, so malformed input surfaces wherever a field is read;
    every read of peer data runs inside this guard.
    """
    try:
        yield
    except PeerError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        text = str(exc)
        if "Insufficient data" in text:
            raise PeerError(f"{what} is truncated: {text}", hresult=HResult.CRYPT_E_ASN1_EOD,
                            advice="the server sent an incomplete reply") from None
        raise PeerError(f"{what} is not valid DER/BER: {text or type(exc).__name__}",
                        hresult=HResult.CRYPT_E_ASN1_BADTAG) from None


def as_type(value: core.Asn1Value, spec: type[core.Asn1Value]) -> core.Asn1Value:
    """An attribute value as `spec`: asn1crypto types the attributes it knows, others are Any."""
    from asn1crypto import core

    if isinstance(value, core.Any):
        return value.parse(spec)
    return value


def check_start(data: bytes, what: str) -> None:
    """Refuse at once what cannot be CMS at all: nothing, or not a SEQUENCE."""
    if not data:
        raise PeerError(f"{what} is empty", hresult=HResult.CRYPT_E_ASN1_EOD)
    if data[0] != 0x30:  # a ContentInfo is a SEQUENCE; anything else is not CMS at all
        start = data[:16]
        shown = start.decode("ascii") if start.isascii() and start.decode("ascii").isprintable() \
            else start.hex()
        raise PeerError(f"{what} is not DER: it starts with {shown!r}, not a SEQUENCE",
                        hresult=HResult.CRYPT_E_ASN1_BADTAG,
                        advice="the server answered something else than a PKCS#7 message")


def load_content_info(data: bytes, what: str) -> cms.ContentInfo:
    """Parse a ContentInfo with asn1crypto, fully enough that structural errors surface here."""
    from asn1crypto import cms

    check_start(data, what)
    with asn1_errors(what):
        info = cms.ContentInfo.load(ber_to_der_lengths(data), strict=True)
        _ = info["content_type"].native
        _ = info["content"].contents
    return info


def to_asn1_cert(cert: CertificateLike) -> ax509.Certificate:
    from asn1crypto import x509 as ax509

    return ax509.Certificate.load(as_certificate(cert).der)


# --- SignedData: build ----------------------------------------------------------------------

def attribute(oid: str, value: core.Asn1Value) -> cms.CMSAttribute:
    """One signed attribute with a single value (SCEP's attributes are single-valued)."""
    from asn1crypto import cms

    return cms.CMSAttribute({"type": oid, "values": [value]})


def signature_algorithm_for(handle: KeyHandle, digest_alg: HashAlg) -> cms.SignedDigestAlgorithm:
    from asn1crypto import cms

    from keystores.base import KeyAlgorithm

    if handle.spec.algorithm is KeyAlgorithm.EC:
        name = f"{_DIGEST_NAMES[digest_alg]}_ecdsa"
        return cms.SignedDigestAlgorithm({"algorithm": name})
    # rsaEncryption as the signature algorithm (RFC 5652 §5.3 allows it; every SCEP server
    # accepts it, while some reject the sha*WithRSAEncryption OIDs in SignerInfo).
    return cms.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})


# OIDs of what we write (RFC 5652, RFC 3370, RFC 4055, RFC 3565, FIPS 180 / NIST arcs).
OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_MGF1 = "1.2.840.113549.1.1.8"
_DIGEST_OIDS: dict[HashAlg, str] = {
    HashAlg.SHA1: "1.3.14.3.2.26", HashAlg.SHA256: "2.16.840.1.101.3.4.2.1",
    HashAlg.SHA384: "2.16.840.1.101.3.4.2.2", HashAlg.SHA512: "2.16.840.1.101.3.4.2.3"}
_ECDSA_OIDS: dict[HashAlg, str] = {
    HashAlg.SHA1: "1.2.840.10045.4.1", HashAlg.SHA256: "1.2.840.10045.4.3.2",
    HashAlg.SHA384: "1.2.840.10045.4.3.3", HashAlg.SHA512: "1.2.840.10045.4.3.4"}
_CIPHER_OIDS: dict[ContentCipher, str] = {
    ContentCipher.DES: "1.3.14.3.2.7", ContentCipher.DES3: "1.2.840.113549.3.7",
    ContentCipher.AES128: "2.16.840.1.101.3.4.1.2", ContentCipher.AES192:
    "2.16.840.1.101.3.4.1.22", ContentCipher.AES256: "2.16.840.1.101.3.4.1.42"}


def encode_attribute(oid: str, value_der: bytes) -> bytes:
    """DER Attribute { type, SET { value } } from an already-encoded value."""
    return der.seq(der.oid(oid), der.tlv(0x31, value_der))


def _issuer_and_serial(cert: CertificateLike) -> bytes:
    ours = as_certificate(cert)
    return der.seq(ours.issuer_der, der.integer(ours.serial_number))


def _signature_algorithm_der(handle: KeyHandle, digest_alg: HashAlg) -> bytes:
    from keystores.base import KeyAlgorithm

    if handle.spec.algorithm is KeyAlgorithm.EC:
        return der.algorithm(_ECDSA_OIDS[digest_alg], None)
    # rsaEncryption as the signature algorithm (RFC 5652 §5.3 allows it; every SCEP server
    # accepts it, while some reject the sha*WithRSAEncryption OIDs in SignerInfo).
    return der.algorithm(OID_RSA_ENCRYPTION)


def sign_data(content: bytes, *, signer_cert: CertificateLike, handle: KeyHandle,
              digest_alg: HashAlg, attributes: Sequence[cms.CMSAttribute | bytes],
              signing_time: datetime | None = None) -> bytes:
    """Build a DER ContentInfo(SignedData) over `content` (eContentType id-data).

    contentType and messageDigest (RFC 5652 §11) and signingTime are added to `attributes`
    (asn1crypto attributes, or DER-encoded ones from `encode_attribute`); the signature
    covers the DER SET OF the signed attributes (§5.4) and is made by `handle`. The signer
    certificate is included so the CA can encrypt its reply to it (RFC 8894 §3.2.2).
    """
    signer = as_certificate(signer_cert)
    attrs = [encode_attribute("1.2.840.113549.1.9.3", der.oid(OID_DATA)),
             encode_attribute("1.2.840.113549.1.9.4",
                              der.octet_string(digest(content, digest_alg)))]
    if signing_time is not None:
        attrs.append(encode_attribute("1.2.840.113549.1.9.5", der.time(signing_time)))
    attrs.extend(a if isinstance(a, bytes) else bytes(a.dump()) for a in attributes)
    attrs.sort()  # DER SET OF: sorted by encoding (X.690 §11.6)
    body = b"".join(attrs)
    signature = handle.sign(der.tlv(0x31, body), digest_alg)
    digest_algo = der.algorithm(_DIGEST_OIDS[digest_alg])
    signer_info = der.seq(
        der.integer(1), _issuer_and_serial(signer), digest_algo,
        der.tlv(0xA0, body),  # signedAttrs [0] IMPLICIT
        _signature_algorithm_der(handle, digest_alg), der.octet_string(signature))
    signed = der.seq(
        der.integer(1), der.tlv(0x31, digest_algo),
        der.seq(der.oid(OID_DATA), der.explicit(0, der.octet_string(content))),
        der.tlv(0xA0, signer.der),  # certificates [0] IMPLICIT
        der.tlv(0x31, signer_info))
    return der.seq(der.oid(OID_SIGNED_DATA), der.explicit(0, signed))


def degenerate_certs_only(certs: Sequence[CertificateLike],
                          crls: Sequence[bytes] = ()) -> bytes:
    """A certs-only SignedData (RFC 8894 §3.4): how CertRep and GetCACert carry certificates."""
    parts = [der.integer(1), der.tlv(0x31), der.seq(der.oid(OID_DATA)),
             der.tlv(0xA0, *(as_certificate(c).der for c in certs))]
    if crls:
        parts.append(der.tlv(0xA1, *crls))
    parts.append(der.tlv(0x31))
    return der.seq(der.oid(OID_SIGNED_DATA), der.explicit(0, der.seq(*parts)))


# --- EnvelopedData: build -------------------------------------------------------------------

def envelope(content: bytes, recipient: CertificateLike, cipher: ContentCipher,
             rand: RandomBytes = os.urandom, oaep: HashAlg | None = None) -> bytes:
    """Encrypt `content` for `recipient` (RFC 8894 §3.2.2: pkcsPKIEnvelope).

    The content-encryption key is transported with RSA PKCS#1 v1.5 (rsaEncryption), the one
    key-transport every SCEP CA decrypts, or RSAES-OAEP with `oaep` as hash and MGF1 hash
    (RFC 4055 §4.1; CAs may answer that way); the content is CBC with PKCS#7 padding.
    """
    recipient = as_certificate(recipient)
    public = recipient.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise PeerError("the CA/RA encryption certificate does not hold an RSA key, so no "
                        "key can be transported to it", hresult=HResult.NTE_BAD_ALGID)
    key = rand(cipher.key_size)
    iv = rand(cipher.block_size)
    ciphertext = encrypt_content(content, cipher, key, iv)
    if oaep is None:
        kea = der.algorithm(OID_RSA_ENCRYPTION)
        encrypted_key = public.encrypt(key, padding.PKCS1v15())
    else:
        h = _HASHES[oaep]()
        hash_alg = der.algorithm(_DIGEST_OIDS[oaep])
        # RSAES-OAEP-params (RFC 4055 §4.1): SHA-1 / MGF1-SHA-1 are the DEFAULTs, omitted
        params = b"" if oaep is HashAlg.SHA1 else (
            der.explicit(0, hash_alg) + der.explicit(1, der.seq(der.oid(OID_MGF1), hash_alg)))
        kea = der.algorithm(OID_RSAES_OAEP, der.seq(params))
        encrypted_key = public.encrypt(key, padding.OAEP(padding.MGF1(h), h, None))
    ktri = der.seq(der.integer(0), _issuer_and_serial(recipient), kea,
                   der.octet_string(encrypted_key))
    eci = der.seq(der.oid(OID_DATA), der.algorithm(_CIPHER_OIDS[cipher], der.octet_string(iv)),
                  der.tlv(0x80, ciphertext))  # encryptedContent [0] IMPLICIT OCTET STRING
    enveloped = der.seq(der.integer(0), der.tlv(0x31, ktri), eci)
    return der.seq(der.oid(OID_ENVELOPED_DATA), der.explicit(0, enveloped))


def _block_cipher(cipher: ContentCipher, key: bytes) -> object:
    from cryptography.hazmat.primitives.ciphers import algorithms

    if cipher is ContentCipher.DES:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

        return TripleDES(key * 3)  # single DES is 3DES with K1 = K2 = K3
    if cipher is ContentCipher.DES3:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

        return TripleDES(key)
    return algorithms.AES(key)


def encrypt_content(content: bytes, cipher: ContentCipher, key: bytes, iv: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    block = cipher.block_size
    pad = block - len(content) % block
    enc = Cipher(_block_cipher(cipher, key), modes.CBC(iv)).encryptor()  # type: ignore[arg-type]
    return enc.update(content + bytes([pad]) * pad) + enc.finalize()


def decrypt_content(ciphertext: bytes, cipher: ContentCipher, key: bytes, iv: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    block = cipher.block_size
    if len(key) != cipher.key_size:
        raise PeerError(f"the content-encryption key has {len(key)} bytes, {cipher.value} "
                        f"needs {cipher.key_size}: the key was not encrypted for us",
                        hresult=HResult.NTE_BAD_KEY)
    if len(iv) != block:
        raise PeerError(f"the {cipher.value} IV has {len(iv)} bytes, not {block}",
                        hresult=HResult.NTE_BAD_DATA)
    if not ciphertext or len(ciphertext) % block:
        raise PeerError(f"the encrypted content ({len(ciphertext)} bytes) is not a whole "
                        f"number of {block}-byte blocks", hresult=HResult.NTE_BAD_DATA)
    dec = Cipher(_block_cipher(cipher, key), modes.CBC(iv)).decryptor()  # type: ignore[arg-type]
    plain = dec.update(ciphertext) + dec.finalize()
    pad = plain[-1]
    if not 1 <= pad <= block or plain[-pad:] != bytes([pad]) * pad:
        raise PeerError("the decrypted content has invalid padding (wrong key or corrupted "
                        "ciphertext)", hresult=HResult.NTE_BAD_DATA)
    return plain[:-pad]
