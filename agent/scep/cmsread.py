"""Reading CMS (RFC 5652) as SCEP replies carry it: verify a SignedData, open an
EnvelopedData, list a certs-only message's certificates. Sans-IO.

The fields are walked with `agent.scep.ber` (BER accepted: indefinite lengths, chunked
OCTET STRINGs, as Go and Java send them) rather than asn1crypto's schemas, whose import costs
a one-shot enrollment more than the parse itself. Every failure is a `PeerError` carrying the
CryptoAPI HRESULT Windows would report (CRYPT_E_*, NTE_*), inside `cms.asn1_errors` for
malformed input. `agent.scep.cms` re-exports these functions (its historical home).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.scep import ber, der
from agent.scep.capabilities import ContentCipher
from agent.scep.certificate import Certificate, as_certificate, names_equal
from agent.scep.cms import (
    _CIPHER_OIDS,
    _DIGEST_OIDS,
    _HASHES,
    OID_ENVELOPED_DATA,
    OID_RSA_ENCRYPTION,
    OID_RSAES_OAEP,
    OID_SIGNED_DATA,
    asn1_errors,
    check_start,
    decrypt_content,
    digest,
)
from keystores.base import HashAlg, KeyHandle, KeyStoreError, Padding

if TYPE_CHECKING:
    from asn1crypto import core

    from agent.scep.certificate import CertificateLike

_DIGEST_BY_OID = {v: k for k, v in _DIGEST_OIDS.items()}
_CIPHER_BY_OID = {v: k for k, v in _CIPHER_OIDS.items()}
OID_RSASSA_PSS = "1.2.840.113549.1.1.10"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
# Names for messages (the ones asn1crypto gives, so texts stay as they were).
_NAMES = {
    "1.2.840.113549.1.7.1": "data", OID_SIGNED_DATA: "signed_data",
    OID_ENVELOPED_DATA: "enveloped_data", "1.2.840.113549.1.7.5": "digested_data",
    "1.2.840.113549.1.7.6": "encrypted_data", "1.2.840.113549.1.9.16.1.2": "authenticated_data",
    "1.2.840.113549.2.5": "md5", "1.3.14.3.2.26": "sha1", "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512", "2.16.840.1.101.3.4.2.8": "sha3_256",
    OID_RSA_ENCRYPTION: "rsaes_pkcs1v15", OID_RSAES_OAEP: "rsaes_oaep",
    "1.2.840.113549.3.2": "rc2", "1.2.840.113549.3.4": "rc4",
    "2.16.840.1.101.3.4.1.6": "aes128_gcm", "2.16.840.1.101.3.4.1.46": "aes256_gcm",
}


def _name(oid: str) -> str:
    return _NAMES.get(oid, oid)


def _content(data: bytes, what: str, expected: str) -> list[ber.Element]:
    """The fields of a ContentInfo's content, which must be of type `expected`."""
    check_start(data, what)
    with asn1_errors(what):
        info = ber.sequence(ber.one_element(data), "ContentInfo")
        if len(info) != 2:
            raise ValueError(f"ContentInfo has {len(info)} fields, not 2")
        ctype = ber.read_oid(info[0], "contentType")
        if ctype != expected:
            kind = "signedData" if expected == OID_SIGNED_DATA else "envelopedData"
            raise PeerError(f"{what} is a {_name(ctype)}, not {kind}",
                            hresult=HResult.CRYPT_E_INVALID_MSG_TYPE)
        inner = ber.expect(info[1], 0, "content [0]", cls=2, constructed=True)
        return ber.sequence(ber.one_element(inner), _name(expected))


# --- who a SignerIdentifier / RecipientIdentifier names ---------------------------------------

Rid = tuple[bytes, int] | bytes  # (issuer Name encoding, serial) or a subjectKeyIdentifier


def _rid(element: ber.Element) -> Rid:
    """issuerAndSerialNumber (a SEQUENCE) or [0] IMPLICIT SubjectKeyIdentifier."""
    if element[0] == 2 and element[2] == 0:
        return ber.ber_octets(element[1], element[3])
    parts = ber.sequence(element, "issuerAndSerialNumber")
    if len(parts) != 2:
        raise ValueError("issuerAndSerialNumber needs issuer and serialNumber")
    ber.expect(parts[0], ber.SEQUENCE, "issuer", constructed=True)
    return parts[0][4], ber.read_int(parts[1], "serialNumber")


def _rid_matches(rid: Rid, cert: Certificate) -> bool:
    """Does a RecipientIdentifier / SignerIdentifier name `cert`?

    issuerAndSerialNumber compares the issuer's DER first (the usual case, cheap) and falls
    back to RFC 5280 §7.1 name comparison (case and space folding) only when the bytes differ.
    """
    if isinstance(rid, tuple):
        issuer, serial = rid
        return serial == cert.serial_number and names_equal(issuer, cert.issuer_der)
    ski = cert.subject_key_identifier
    return ski is not None and rid == ski


def _describe(rid: Rid) -> str:
    if isinstance(rid, tuple):
        from agent.csr import name_to_str

        return f"issuer {name_to_str(ber.ber_to_der_lengths(rid[0]))}, serial {rid[1]:x}"
    return f"key id {rid.hex()}"


# --- EnvelopedData: open --------------------------------------------------------------------

def _encrypted_content(eci_contents: bytes, what: str) -> tuple[ContentCipher, bytes, bytes]:
    """Cipher, IV and ciphertext of an EncryptedContentInfo.

    Go's pkcs7 (micromdm) sends encryptedContent as a *constructed* [0] IMPLICIT OCTET STRING.
    """
    elements = ber.ber_elements(eci_contents)
    if len(elements) < 2:
        raise PeerError(f"{what} has an incomplete EncryptedContentInfo",
                        hresult=HResult.CRYPT_E_BAD_MSG)
    alg_oid, params = ber.algorithm(elements[1], "contentEncryptionAlgorithm")
    if alg_oid not in _CIPHER_BY_OID:
        raise PeerError(f"content encryption {alg_oid} ({_name(alg_oid)}) is not "
                        "supported (DES, 3DES and AES-CBC are)",
                        hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
    cipher = _CIPHER_BY_OID[alg_oid]
    if params is None or params[0] != 0 or params[2] != ber.OCTET_STRING:
        raise PeerError(f"{cipher.value} without an IV", hresult=HResult.NTE_BAD_DATA)
    iv = ber.read_octets(params, "the IV")
    content = next((e for e in elements[2:] if e[0] == 2 and e[2] == 0), None)
    if content is None:
        raise PeerError(f"{what} has no encrypted content", hresult=HResult.CRYPT_E_BAD_MSG)
    return cipher, iv, ber.ber_octets(content[1], content[3])


def _oaep_hashes(params: ber.Element | None) -> tuple[str, str]:
    """(hash OID, MGF1 hash OID) of RSAES-OAEP-params (RFC 4055 §4.1); SHA-1 by default."""
    sha1 = _DIGEST_OIDS[HashAlg.SHA1]
    if params is None or (params[0] == 0 and params[2] == ber.NULL):
        return sha1, sha1
    hash_oid = mgf_hash = sha1
    for part in ber.sequence(params, "RSAES-OAEP-params"):
        if part[0] != 2:
            raise ValueError("RSAES-OAEP-params holds an untagged field")
        if part[2] == 0:  # [0] hashAlgorithm
            hash_oid = ber.algorithm(ber.one_element(part[3]), "hashAlgorithm")[0]
        elif part[2] == 1:  # [1] maskGenAlgorithm: MGF1 with its hash as parameters
            _, mgf_params = ber.algorithm(ber.one_element(part[3]), "maskGenAlgorithm")
            if mgf_params is None:
                raise ValueError("maskGenAlgorithm without its hash")
            mgf_hash = ber.algorithm(mgf_params, "the MGF1 hash")[0]
    return hash_oid, mgf_hash


def open_envelope(data: bytes, handle: KeyHandle, recipient: CertificateLike,
                  what: str = "the pkcsPKIEnvelope") -> bytes:
    """Decrypt an EnvelopedData addressed to `recipient` with `handle`'s private key."""
    recipient_cert = as_certificate(recipient)
    fields = _content(data, what, OID_ENVELOPED_DATA)
    with asn1_errors(what):
        # version, originatorInfo [0] OPTIONAL, recipientInfos, encryptedContentInfo, ...
        at = 2 if len(fields) > 1 and fields[1][0] == 2 and fields[1][2] == 0 else 1
        if len(fields) < at + 2:
            raise ValueError("EnvelopedData is incomplete")
        ktri = None
        for ri in ber.ber_elements(ber.expect(fields[at], ber.SET, "recipientInfos",
                                              constructed=True)):
            if ri[0] != 0:  # kari [1], kekri [2], pwri [3], ori [4]: not for an RSA key
                continue
            parts = ber.sequence(ri, "KeyTransRecipientInfo")
            if len(parts) != 4:
                raise ValueError("KeyTransRecipientInfo needs four fields")
            if _rid_matches(_rid(parts[1]), recipient_cert):
                ktri = parts
                break
        if ktri is None:
            raise PeerError(f"{what} is not encrypted to our certificate (serial "
                            f"{recipient_cert.serial_number:x}, issuer "
                            f"{recipient_cert.issuer})",
                            hresult=HResult.CRYPT_E_RECIPIENT_NOT_FOUND)
        kea_oid, kea_params = ber.algorithm(ktri[2], "keyEncryptionAlgorithm")
        oaep_hash = HashAlg.SHA1
        if kea_oid == OID_RSA_ENCRYPTION:
            pad = Padding.PKCS1V15
        elif kea_oid == OID_RSAES_OAEP:
            pad = Padding.OAEP
            hash_oid, mgf_oid = _oaep_hashes(kea_params)
            if hash_oid not in _DIGEST_BY_OID:
                raise PeerError(f"RSAES-OAEP with {_name(hash_oid)} is not supported",
                                hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
            oaep_hash = _DIGEST_BY_OID[hash_oid]
            if mgf_oid != hash_oid:
                # Key stores (TPM, CNG) implement OAEP with MGF1 over the same hash only.
                raise PeerError(f"RSAES-OAEP with {_name(hash_oid)} and MGF1-{_name(mgf_oid)} "
                                "is not supported (MGF1 must use the OAEP hash)",
                                hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
        else:
            raise PeerError(f"key transport {kea_oid} ({_name(kea_oid)}) is not "
                            "supported (RSA PKCS#1 v1.5 and RSAES-OAEP are)",
                            hresult=HResult.CRYPT_E_UNKNOWN_ALGO)
        encrypted_key = ber.read_octets(ktri[3], "encryptedKey")
        eci = ber.expect(fields[at + 1], ber.SEQUENCE, "encryptedContentInfo",
                         constructed=True)
        cipher, iv, ciphertext = _encrypted_content(eci, what)
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
    """A SignedData whose single signature was checked against a trusted certificate.

    `raw_attributes`: dotted OID -> the encoding of the attribute's (single) value.
    `attributes`: the same as asn1crypto values (for callers that work with asn1crypto,
    such as the lab CA), built on first use.
    """

    content: bytes
    signer: Certificate
    digest_alg: HashAlg
    raw_attributes: dict[str, ber.Element] = field(repr=False)
    signed_attributes: bytes = field(repr=False)  # the SET OF Attribute the signature covers

    @cached_property
    def attributes(self) -> dict[str, core.Asn1Value]:
        from asn1crypto import cms

        parsed = cms.CMSAttributes.load(ber.ber_to_der_lengths(self.signed_attributes))
        return {attr["type"].dotted: attr["values"][0] for attr in parsed}


def _find_signer(sid: Rid, candidates: Sequence[Certificate]) -> Certificate | None:
    for cand in candidates:
        if _rid_matches(sid, cand):  # SignerIdentifier has the same two choices
            return cand
    return None


def _verify_signature(cert: Certificate, signature: bytes, data: bytes,
                      sig_oid: str, sig_params: ber.Element | None, digest_alg: HashAlg) -> bool:
    public = cert.public_key()
    hash_obj = _HASHES[digest_alg]()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            if sig_oid == OID_RSASSA_PSS:
                salt = 20  # RSASSA-PSS-params saltLength DEFAULT 20 (RFC 4055 §3.1)
                for part in ber.sequence(sig_params, "RSASSA-PSS-params") if sig_params else ():
                    if part[0] == 2 and part[2] == 2:
                        salt = ber.read_int(ber.one_element(part[3]), "saltLength")
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


def _reencoded(attributes: list[ber.Element]) -> bytes:
    """The attributes as DER: definite lengths, SET OF sorted (X.690 §11.6)."""
    return der.set_of(ber.ber_to_der_lengths(a[4]) for a in attributes)


def verify_signed_data(data: bytes, trusted: Sequence[CertificateLike],
                       what: str = "the CertRep") -> VerifiedSignedData:
    """Check a SignedData's one SignerInfo against `trusted` (the GetCACert certificates).

    A signer certificate embedded in the message is never trusted by itself: the signer must
    be one of the certificates the CAThumbprint-checked GetCACert returned. Which of those may
    sign (key usage) is decided when GetCACert is parsed (`cacerts.assign_roles`): a CA
    without RA signs with its CA certificate whatever its key usage says (micromdm's has
    only keyCertSign/cRLSign), as every SCEP client accepts.
    """
    fields = _content(data, what, OID_SIGNED_DATA)
    with asn1_errors(what):
        # version, digestAlgorithms, encapContentInfo, certificates [0], crls [1], signerInfos
        if len(fields) < 4:
            raise ValueError("SignedData is incomplete")
        signer_infos = ber.ber_elements(ber.expect(fields[-1], ber.SET, "signerInfos",
                                                   constructed=True))
        if len(signer_infos) != 1:
            raise PeerError(f"{what} has {len(signer_infos)} signers, SCEP requires one",
                            hresult=HResult.CRYPT_E_SIGNER_NOT_FOUND)
        si = ber.sequence(signer_infos[0], "SignerInfo")
        if len(si) < 5:
            raise ValueError("SignerInfo is incomplete")
        sid = _rid(si[1])
        signer = _find_signer(sid, [as_certificate(c) for c in trusted])
        if signer is None:
            raise PeerError(f"{what} is signed by a certificate ({_describe(sid)}) that is "
                            "not one of the CA/RA certificates from GetCACert",
                            hresult=HResult.CRYPT_E_SIGNER_NOT_FOUND)
        digest_oid, _ = ber.algorithm(si[2], "digestAlgorithm")
        if digest_oid not in _DIGEST_BY_OID:
            raise PeerError(f"{what} uses digest {_name(digest_oid)}, which is not accepted",
                            hresult=HResult.NTE_BAD_ALGID)
        digest_alg = _DIGEST_BY_OID[digest_oid]
        signed_attrs = si[3]
        if signed_attrs[0] != 2 or signed_attrs[2] != 0 or not signed_attrs[3]:
            raise PeerError(f"{what} has no signed attributes",
                            hresult=HResult.CRYPT_E_AUTH_ATTR_MISSING)
        raw_attrs = ber.ber_elements(signed_attrs[3])
        attrs: dict[str, ber.Element] = {}
        for attr in raw_attrs:
            parts = ber.sequence(attr, "Attribute")
            if len(parts) != 2:
                raise ValueError("an Attribute needs a type and values")
            oid = ber.read_oid(parts[0], "attrType")
            values = ber.ber_elements(ber.expect(parts[1], ber.SET, "attrValues",
                                                 constructed=True))
            if len(values) != 1:
                raise PeerError(f"{what}: attribute {oid} has {len(values)} values, one "
                                "expected", hresult=HResult.CRYPT_E_BAD_MSG)
            attrs[oid] = values[0]
        sig_oid, sig_params = ber.algorithm(si[4], "signatureAlgorithm")
        signature = ber.read_octets(si[5], "signature") if len(si) > 5 else b""
        encap = ber.sequence(fields[2], "encapContentInfo")
        content = b""
        if len(encap) > 1:
            econtent = ber.expect(encap[1], 0, "eContent [0]", cls=2, constructed=True)
            content = ber.read_octets(ber.one_element(econtent), "eContent")
        # The signature covers the attributes with the SET OF tag (RFC 5652 §5.4). Take the
        # bytes as received (re-tagged) so BER-encoding signers verify too; fall back to DER.
        as_set = b"\x31" + ber.ber_to_der_lengths(signed_attrs[4])[1:]
        if not _verify_signature(signer, signature, as_set, sig_oid, sig_params,
                                 digest_alg) and (
                (reencoded := _reencoded(raw_attrs)) == as_set
                or not _verify_signature(signer, signature, reencoded, sig_oid, sig_params,
                                         digest_alg)):
            raise PeerError(f"the signature of {what} does not verify with the key of "
                            f"{signer.subject}",
                            hresult=HResult.NTE_BAD_SIGNATURE,
                            advice="the reply was altered or not made by this CA")
        md = attrs.get(OID_MESSAGE_DIGEST)
        if md is None:
            raise PeerError(f"{what} has no messageDigest attribute",
                            hresult=HResult.CRYPT_E_AUTH_ATTR_MISSING)
        if ber.read_octets(md, "messageDigest") != digest(content, digest_alg):
            raise PeerError(f"the messageDigest of {what} does not match its content",
                            hresult=HResult.CRYPT_E_HASH_VALUE)
    return VerifiedSignedData(content, signer, digest_alg, attrs, as_set)


def certs_from_degenerate(data: bytes, what: str) -> tuple[list[Certificate], list[bytes]]:
    """The certificates and CRLs of a certs-only SignedData (RFC 8894 §3.4)."""
    fields = _content(data, what, OID_SIGNED_DATA)
    raw_certs: list[bytes] = []
    crls: list[bytes] = []
    with asn1_errors(what):
        for element in fields[3:]:  # after version, digestAlgorithms, encapContentInfo
            if element[0] != 2 or element[2] not in (0, 1):
                continue  # signerInfos (empty here)
            # certificates [0] / crls [1] IMPLICIT SET: plain SEQUENCEs are the X.509 ones
            # (the other CHOICEs are tagged: attribute certificates, other formats)
            found = [ber.ber_to_der_lengths(e[4]) for e in ber.ber_elements(element[3])
                     if e[0] == 0 and e[2] == ber.SEQUENCE]
            (raw_certs if element[2] == 0 else crls).extend(found)
    certs: list[Certificate] = []
    for raw in raw_certs:
        try:
            certs.append(Certificate(raw))
        except ValueError as exc:
            raise PeerError(f"{what} holds an invalid certificate: {exc}",
                            hresult=HResult.CRYPT_E_BAD_ENCODE) from None
    return certs, crls
