"""Test helpers for the SCEP tests: a KeyHandle over a `cryptography` key, tiny test CAs.

`CryptoKeyHandle` implements the `keystores.base.KeyHandle` protocol directly over a private key
object. It is the test stand-in for hand-made keys (CA keys that sign crafted CertReps, keys
whose public key must differ); enrollment tests also run with the real key stores.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from keystores.base import (
    HashAlg,
    KeyAlgorithm,
    KeySpec,
    KeyStoreError,
    Padding,
    PublicKey,
    key_id_for,
)

_HASH = {HashAlg.SHA1: hashes.SHA1, HashAlg.SHA256: hashes.SHA256,
         HashAlg.SHA384: hashes.SHA384, HashAlg.SHA512: hashes.SHA512}


class CryptoKeyHandle:
    """KeyHandle over an in-memory `cryptography` private key."""

    def __init__(self, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self.key = key
        if isinstance(key, rsa.RSAPrivateKey):
            self._spec = KeySpec(KeyAlgorithm.RSA, key.key_size, exportable=True)
        else:
            self._spec = KeySpec(KeyAlgorithm.EC, key.curve.key_size, exportable=True)
        self.sign_calls = 0
        self.decrypt_calls = 0

    @classmethod
    def rsa(cls, bits: int = 2048) -> CryptoKeyHandle:
        return cls(rsa.generate_private_key(65537, bits))

    @property
    def key_id(self) -> str:
        return key_id_for(self.public_key())

    @property
    def spec(self) -> KeySpec:
        return self._spec

    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def sign(self, data: bytes, hash_alg: HashAlg, padding_: Padding = Padding.PKCS1V15) -> bytes:
        self.sign_calls += 1
        h = _HASH[hash_alg]()
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(h))
        if padding_ is Padding.PSS:
            return self.key.sign(data, padding.PSS(padding.MGF1(h), padding.PSS.DIGEST_LENGTH), h)
        return self.key.sign(data, padding.PKCS1v15(), h)

    def decrypt(self, ciphertext: bytes, padding_: Padding = Padding.PKCS1V15,
                oaep_hash: HashAlg = HashAlg.SHA1) -> bytes:
        self.decrypt_calls += 1
        assert isinstance(self.key, rsa.RSAPrivateKey)
        try:
            if padding_ is Padding.OAEP:
                h = _HASH[oaep_hash]()
                return self.key.decrypt(ciphertext, padding.OAEP(padding.MGF1(h), h, None))
            return self.key.decrypt(ciphertext, padding.PKCS1v15())
        except ValueError as exc:
            raise KeyStoreError(f"decryption failed: {exc}") from None


@dataclass
class TestCert:
    cert: x509.Certificate
    key: CryptoKeyHandle


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, *, issuer: TestCert | None = None, ca: bool = False,
              key_usage: dict[str, bool] | None = None,
              key: CryptoKeyHandle | None = None, days: int = 30) -> TestCert:
    """A certificate for tests: self-signed CA, or issued by `issuer`, with chosen key usage."""
    key = key or CryptoKeyHandle.rsa()
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer else _name(cn))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if key_usage is not None:
        flags = {f: False for f in ("digital_signature", "content_commitment",
                                    "key_encipherment", "data_encipherment", "key_agreement",
                                    "key_cert_sign", "crl_sign", "encipher_only",
                                    "decipher_only")}
        flags.update(key_usage)
        builder = builder.add_extension(x509.KeyUsage(**flags), critical=True)
    signer = issuer.key.key if issuer else key.key
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    return TestCert(cert, key)


def make_ca(cn: str = "Test SCEP CA") -> TestCert:
    return make_cert(cn, ca=True, key_usage={"digital_signature": True, "key_cert_sign": True,
                                             "crl_sign": True})


def make_ndes_like(cn: str = "Test Issuing CA") -> tuple[TestCert, TestCert, TestCert]:
    """An NDES-style set: the CA, an RA signing cert and a separate RA encryption cert."""
    ca = make_ca(cn)
    ra_sign = make_cert("NDES RA Sign", issuer=ca, key_usage={"digital_signature": True})
    ra_enc = make_cert("NDES RA Encrypt", issuer=ca, key_usage={"key_encipherment": True})
    return ca, ra_sign, ra_enc
