"""The CMS layer SCEP needs (RFC 5652 as profiled by RFC 8894 §3), built with asn1crypto.

Sans-IO: bytes and key handles in, bytes and verified objects out. `cryptography` cannot add
SCEP's signed attributes nor sign through a key handle (a TPM key never leaves the TPM), so the
structures are assembled with asn1crypto, signatures are made by `KeyHandle.sign`, decryption
of the content-encryption key by `KeyHandle.decrypt`, and `cryptography` does the symmetric
ciphers and the verification of the CA's signature.

Parsing is tolerant of BER (indefinite lengths, constructed OCTET STRINGs), as Go SCEP servers
send it, and strict about everything that matters: every failure is a `PeerError` carrying
the CryptoAPI HRESULT Windows would report (CRYPT_E_*, NTE_*) and a message naming the fault.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from asn1crypto import algos, cms, core
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.scep import der
from agent.scep.ber import ber_elements, ber_octets, ber_to_der_lengths
from agent.scep.capabilities import ContentCipher
from keystores.base import HashAlg, KeyHandle, KeyStoreError, Padding

RandomBytes = Callable[[int], bytes]

# asn1crypto names of the content-encryption algorithms SCEP uses (RFC 8894 §3.5.2).
_CIPHER_NAMES: dict[ContentCipher, str] = {
    ContentCipher.DES: "des", ContentCipher.DES3: "tripledes_3key",
    ContentCipher.AES128: "aes128_cbc", ContentCipher.AES192: "aes192_cbc",
    ContentCipher.AES256: "aes256_cbc",
}
_CIPHER_BY_NAME = {v: k for k, v in _CIPHER_NAMES.items()}
_DIGEST_NAMES: dict[HashAlg, str] = {HashAlg.SHA1: "sha1", HashAlg.SHA256: "sha256",
                                     HashAlg.SHA384: "sha384", HashAlg.SHA512: "sha512"}
_DIGEST_BY_NAME = {v: k for k, v in _DIGEST_NAMES.items()}
_HASHES: dict[HashAlg, Callable[[], hashes.HashAlgorithm]] = {
    HashAlg.SHA1: hashes.SHA1, HashAlg.SHA256: hashes.SHA256,
    HashAlg.SHA384: hashes.SHA384, HashAlg.SHA512: hashes.SHA512}


def digest(data: bytes, alg: HashAlg) -> bytes:
    return hashlib.new(alg.value, data).digest()


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
    if isinstance(value, core.Any):
        return value.parse(spec)
    return value


def load_content_info(data: bytes, what: str) -> cms.ContentInfo:
    """Parse a ContentInfo fully enough that structural errors surface here."""
    if not data:
        raise PeerError(f"{what} is empty", hresult=HResult.CRYPT_E_ASN1_EOD)
    if data[0] != 0x30:  # a ContentInfo is a SEQUENCE; anything else is not CMS at all
        start = data[:16]
        shown = start.decode("ascii") if start.isascii() and start.decode("ascii").isprintable() \
            else start.hex()
        raise PeerError(f"{what} is not DER: it starts with {shown!r}, not a SEQUENCE",
                        hresult=HResult.CRYPT_E_ASN1_BADTAG,
                        advice="the server answered something else than a PKCS#7 message")
    with asn1_errors(what):
        info = cms.ContentInfo.load(ber_to_der_lengths(data), strict=True)
        _ = info["content_type"].native
        _ = info["content"].contents
    return info


def to_asn1_cert(cert: x509.Certificate) -> ax509.Certificate:
    from cryptography.hazmat.primitives.serialization import Encoding

    return ax509.Certificate.load(cert.public_bytes(Encoding.DER))


# --- SignedData: build ----------------------------------------------------------------------

def attribute(oid: str, value: core.Asn1Value) -> cms.CMSAttribute:
    """One signed attribute with a single value (SCEP's attributes are single-valued)."""
    return cms.CMSAttribute({"type": oid, "values": [value]})


def signature_algorithm_for(handle: KeyHandle, digest_alg: HashAlg) -> cms.SignedDigestAlgorithm:
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


def _issuer_and_serial(cert: x509.Certificate) -> bytes:
    return der.seq(cert.issuer.public_bytes(), der.integer(cert.serial_number))


def _signature_algorithm_der(handle: KeyHandle, digest_alg: HashAlg) -> bytes:
    from keystores.base import KeyAlgorithm

    if handle.spec.algorithm is KeyAlgorithm.EC:
        return der.algorithm(_ECDSA_OIDS[digest_alg], None)
    # rsaEncryption as the signature algorithm (RFC 5652 §5.3 allows it; every SCEP server
    # accepts it, while some reject the sha*WithRSAEncryption OIDs in SignerInfo).
    return der.algorithm(OID_RSA_ENCRYPTION)


def sign_data(content: bytes, *, signer_cert: x509.Certificate, handle: KeyHandle,
              digest_alg: HashAlg, attributes: Sequence[cms.CMSAttribute | bytes],
              signing_time: datetime | None = None) -> bytes:
    """Build a DER ContentInfo(SignedData) over `content` (eContentType id-data).

    contentType and messageDigest (RFC 5652 §11) and signingTime are added to `attributes`
    (asn1crypto attributes, or DER-encoded ones from `encode_attribute`); the signature
    covers the DER SET OF the signed attributes (§5.4) and is made by `handle`. The signer
    certificate is included so the CA can encrypt its reply to it (RFC 8894 §3.2.2).
    """
    from cryptography.hazmat.primitives.serialization import Encoding

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
        der.integer(1), _issuer_and_serial(signer_cert), digest_algo,
        der.tlv(0xA0, body),  # signedAttrs [0] IMPLICIT
        _signature_algorithm_der(handle, digest_alg), der.octet_string(signature))
    signed = der.seq(
        der.integer(1), der.tlv(0x31, digest_algo),
        der.seq(der.oid(OID_DATA), der.explicit(0, der.octet_string(content))),
        der.tlv(0xA0, signer_cert.public_bytes(Encoding.DER)),  # certificates [0] IMPLICIT
        der.tlv(0x31, signer_info))
    return der.seq(der.oid(OID_SIGNED_DATA), der.explicit(0, signed))


def degenerate_certs_only(certs: Sequence[x509.Certificate],
                          crls: Sequence[bytes] = ()) -> bytes:
    """A certs-only SignedData (RFC 8894 §3.4): how CertRep and GetCACert carry certificates."""
    from cryptography.hazmat.primitives.serialization import Encoding

    parts = [der.integer(1), der.tlv(0x31), der.seq(der.oid(OID_DATA)),
             der.tlv(0xA0, *(c.public_bytes(Encoding.DER) for c in certs))]
    if crls:
        parts.append(der.tlv(0xA1, *crls))
    parts.append(der.tlv(0x31))
    return der.seq(der.oid(OID_SIGNED_DATA), der.explicit(0, der.seq(*parts)))


# --- EnvelopedData: build -------------------------------------------------------------------

def envelope(content: bytes, recipient: x509.Certificate, cipher: ContentCipher,
             rand: RandomBytes = os.urandom, oaep: HashAlg | None = None) -> bytes:
    """Encrypt `content` for `recipient` (RFC 8894 §3.2.2: pkcsPKIEnvelope).

    The content-encryption key is transported with RSA PKCS#1 v1.5 (rsaEncryption), the one
    key-transport every SCEP CA decrypts, or RSAES-OAEP with `oaep` as hash and MGF1 hash
    (RFC 4055 §4.1; CAs may answer that way); the content is CBC with PKCS#7 padding.
    """
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


def _encrypted_content(eci_contents: bytes, what: str) -> tuple[ContentCipher, bytes, bytes]:
    """Cipher, IV and ciphertext of an EncryptedContentInfo, read at the TLV level.

    Go's pkcs7 (micromdm) sends encryptedContent as a *constructed* [0] IMPLICIT OCTET STRING,
    which asn1crypto's implicit-tagging code rejects, so the three fields are walked here.
    """
    elements = ber_elements(eci_contents)
    if len(elements) < 2:
        raise PeerError(f"{what} has an incomplete EncryptedContentInfo",
                        hresult=HResult.CRYPT_E_BAD_MSG)
    alg = algos.EncryptionAlgorithm.load(elements[1][4])
    alg_name = alg["algorithm"].native
    if alg_name not in _CIPHER_BY_NAME:
        raise PeerError(f"content encryption {alg['algorithm'].dotted} ({alg_name}) is not "
                        "supported (DES, 3DES and AES-CBC are)",
                        hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
    cipher = _CIPHER_BY_NAME[alg_name]
    iv = alg["parameters"].native
    if not isinstance(iv, bytes):
        raise PeerError(f"{cipher.value} without an IV", hresult=HResult.NTE_BAD_DATA)
    content = next((e for e in elements[2:] if e[0] == 2 and e[2] == 0), None)
    if content is None:
        raise PeerError(f"{what} has no encrypted content", hresult=HResult.CRYPT_E_BAD_MSG)
    return cipher, iv, ber_octets(content[1], content[3])


# --- EnvelopedData: open --------------------------------------------------------------------

def _rid_matches(rid: cms.RecipientIdentifier, cert: x509.Certificate) -> bool:
    """Does a RecipientIdentifier / SignerIdentifier name `cert`?

    issuerAndSerialNumber compares the issuer's DER first (the usual case, cheap) and falls
    back to RFC 5280 §7.1 name comparison (case and space folding) only when the bytes differ.
    """
    if rid.name == "issuer_and_serial_number":
        ias = rid.chosen
        if ias["serial_number"].native != cert.serial_number:
            return False
        if ias["issuer"].dump() == cert.issuer.public_bytes():
            return True
        return bool(ias["issuer"] == to_asn1_cert(cert).issuer)
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return False
    return bool(rid.chosen.native == ski)


def open_envelope(data: bytes, handle: KeyHandle, recipient_cert: x509.Certificate,
                  what: str = "the pkcsPKIEnvelope") -> bytes:
    """Decrypt an EnvelopedData addressed to `recipient_cert` with `handle`'s private key."""
    info = load_content_info(data, what)
    with asn1_errors(what):
        if info["content_type"].native != "enveloped_data":
            raise PeerError(f"{what} is a {info['content_type'].native}, not envelopedData",
                            hresult=HResult.CRYPT_E_INVALID_MSG_TYPE)
        env = info["content"]
        ktri = None
        for ri in env["recipient_infos"]:
            if ri.name == "ktri" and _rid_matches(ri.chosen["rid"], recipient_cert):
                ktri = ri.chosen
                break
        if ktri is None:
            raise PeerError(f"{what} is not encrypted to our certificate (serial "
                            f"{recipient_cert.serial_number:x}, issuer "
                            f"{recipient_cert.issuer.rfc4514_string()})",
                            hresult=HResult.CRYPT_E_RECIPIENT_NOT_FOUND)
        kea = ktri["key_encryption_algorithm"]
        kea_name = kea["algorithm"].native
        oaep_hash = HashAlg.SHA1
        if kea_name == "rsaes_pkcs1v15":
            pad = Padding.PKCS1V15
        elif kea_name == "rsaes_oaep":
            pad = Padding.OAEP
            params = kea["parameters"]
            if params.native is not None:
                hash_name = params["hash_algorithm"]["algorithm"].native
                if hash_name not in _DIGEST_BY_NAME:
                    raise PeerError(f"RSAES-OAEP with {hash_name} is not supported",
                                    hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
                oaep_hash = _DIGEST_BY_NAME[hash_name]
                mgf_hash = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
                if mgf_hash != hash_name:
                    # Key stores (TPM, CNG) implement OAEP with MGF1 over the same hash only.
                    raise PeerError(f"RSAES-OAEP with {hash_name} and MGF1-{mgf_hash} is not "
                                    "supported (MGF1 must use the OAEP hash)",
                                    hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
        else:
            raise PeerError(f"key transport {kea['algorithm'].dotted} ({kea_name}) is not "
                            "supported (RSA PKCS#1 v1.5 and RSAES-OAEP are)",
                            hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
        encrypted_key = ktri["encrypted_key"].native
        cipher, iv, ciphertext = _encrypted_content(env["encrypted_content_info"].contents,
                                                    what)
    try:
        key = handle.decrypt(encrypted_key, pad, oaep_hash)
    except KeyStoreError as exc:
        if exc.hresult != HResult.NTE_BAD_DATA:
            raise
        raise PeerError(f"cannot decrypt the content-encryption key of {what}: {exc.message}",
                        hresult=HResult.NTE_BAD_DATA) from None
    except ValueError as exc:
        raise PeerError(f"cannot decrypt the content-encryption key of {what}: {exc}",
                        hresult=HResult.NTE_BAD_DATA) from None
    return decrypt_content(ciphertext, cipher, key, iv)


# --- SignedData: verify ---------------------------------------------------------------------

@dataclass(frozen=True)
class VerifiedSignedData:
    """A SignedData whose single signature was checked against a trusted certificate."""

    content: bytes
    signer: x509.Certificate
    digest_alg: HashAlg
    attributes: dict[str, core.Asn1Value] = field(repr=False)  # dotted OID -> first value


def _find_signer(sid: cms.SignerIdentifier,
                 candidates: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for cand in candidates:
        if _rid_matches(sid, cand):  # SignerIdentifier has the same two choices
            return cand
    return None


def _verify_signature(cert: x509.Certificate, signature: bytes, data: bytes,
                      sig_alg: cms.SignedDigestAlgorithm, digest_alg: HashAlg) -> bool:
    public = cert.public_key()
    hash_obj = _HASHES[digest_alg]()
    name = sig_alg["algorithm"].native
    try:
        if isinstance(public, rsa.RSAPublicKey):
            if name == "rsassa_pss":
                params = sig_alg["parameters"]
                salt = params["salt_length"].native
                pss = padding.PSS(mgf=padding.MGF1(hash_obj), salt_length=salt)
                public.verify(signature, data, pss, hash_obj)
            else:
                public.verify(signature, data, padding.PKCS1v15(), hash_obj)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hash_obj))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_signed_data(data: bytes, trusted: Sequence[x509.Certificate],
                       what: str = "the CertRep") -> VerifiedSignedData:
    """Check a SignedData's one SignerInfo against `trusted` (the GetCACert certificates).

    A signer certificate embedded in the message is never trusted by itself: the signer must
    be one of the certificates the CAThumbprint-checked GetCACert returned. Which of those may
    sign (key usage) is decided when GetCACert is parsed (`cacerts.assign_roles`): a CA
    without RA signs with its CA certificate whatever its key usage says (micromdm's has
    only keyCertSign/cRLSign), as every SCEP client accepts.
    """
    info = load_content_info(data, what)
    with asn1_errors(what):
        if info["content_type"].native != "signed_data":
            raise PeerError(f"{what} is a {info['content_type'].native}, not signedData",
                            hresult=HResult.CRYPT_E_INVALID_MSG_TYPE)
        signed = info["content"]
        signer_infos = list(signed["signer_infos"])
        if len(signer_infos) != 1:
            raise PeerError(f"{what} has {len(signer_infos)} signers, SCEP requires one",
                            hresult=HResult.CRYPT_E_SIGNER_NOT_FOUND)
        si = signer_infos[0]
        signer = _find_signer(si["sid"], trusted)
        if signer is None:
            sid = si["sid"]
            who = (f"issuer {sid.chosen['issuer'].human_friendly}, serial "
                   f"{sid.chosen['serial_number'].native:x}"
                   if sid.name == "issuer_and_serial_number"
                   else f"key id {sid.chosen.native.hex()}")
            raise PeerError(f"{what} is signed by a certificate ({who}) that is not one of "
                            "the CA/RA certificates from GetCACert",
                            hresult=HResult.CRYPT_E_SIGNER_NOT_FOUND)
        digest_name = si["digest_algorithm"]["algorithm"].native
        if digest_name not in _DIGEST_BY_NAME:
            raise PeerError(f"{what} uses digest {digest_name}, which is not accepted",
                            hresult=HResult.NTE_BAD_ALGID)
        digest_alg = _DIGEST_BY_NAME[digest_name]
        raw_attrs = si["signed_attrs"]
        if not raw_attrs.contents:
            raise PeerError(f"{what} has no signed attributes",
                            hresult=HResult.CRYPT_E_AUTH_ATTR_MISSING)
        attrs: dict[str, core.Asn1Value] = {}
        for attr in raw_attrs:
            values = attr["values"]
            if len(values) != 1:
                raise PeerError(f"{what}: attribute {attr['type'].dotted} has "
                                f"{len(values)} values, one expected",
                                hresult=HResult.CRYPT_E_BAD_MSG)
            attrs[attr["type"].dotted] = values[0]
        econtent = signed["encap_content_info"]["content"]
        content = b"" if econtent.native is None else bytes(econtent.native)
        signature = si["signature"].native
        # The signature covers the attributes with the SET OF tag (RFC 5652 §5.4). Take the
        # bytes as received (re-tagged) so BER-encoding signers verify too; fall back to DER.
        received = raw_attrs.dump()
        as_set = b"\x31" + received[1:]
        sig_alg = si["signature_algorithm"]
        if not _verify_signature(signer, signature, as_set, sig_alg, digest_alg) and (
                (reencoded := cms.CMSAttributes(list(raw_attrs)).dump(force=True)) == as_set
                or not _verify_signature(signer, signature, reencoded, sig_alg, digest_alg)):
            raise PeerError(f"the signature of {what} does not verify with the key of "
                            f"{signer.subject.rfc4514_string()}",
                            hresult=HResult.NTE_BAD_SIGNATURE,
                            advice="the reply was altered or not made by this CA")
        md = attrs.get("1.2.840.113549.1.9.4")
        if md is None:
            raise PeerError(f"{what} has no messageDigest attribute",
                            hresult=HResult.CRYPT_E_AUTH_ATTR_MISSING)
        if as_type(md, core.OctetString).native != digest(content, digest_alg):
            raise PeerError(f"the messageDigest of {what} does not match its content",
                            hresult=HResult.CRYPT_E_HASH_VALUE)
    return VerifiedSignedData(content, signer, digest_alg, attrs)


def certs_from_degenerate(data: bytes, what: str) -> tuple[list[x509.Certificate], list[bytes]]:
    """The certificates and CRLs of a certs-only SignedData (RFC 8894 §3.4)."""
    info = load_content_info(data, what)
    with asn1_errors(what):
        if info["content_type"].native != "signed_data":
            raise PeerError(f"{what} is a {info['content_type'].native}, not signedData",
                            hresult=HResult.CRYPT_E_INVALID_MSG_TYPE)
        signed = info["content"]
        raw_certs = [c.chosen.dump() for c in signed["certificates"] or []
                     if c.name == "certificate"]
        crls = [c.chosen.dump() for c in signed["crls"] or [] if c.name == "crl"]
    certs: list[x509.Certificate] = []
    for raw in raw_certs:
        try:
            certs.append(x509.load_der_x509_certificate(raw))
        except ValueError as exc:
            raise PeerError(f"{what} holds an invalid certificate: {exc}",
                            hresult=HResult.CRYPT_E_BAD_ENCODE) from None
    return certs, crls
