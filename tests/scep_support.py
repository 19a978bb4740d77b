"""Test helpers for the SCEP tests: a KeyHandle over a `cryptography` key, tiny test CAs.

`CryptoKeyHandle` implements the `keystores.base.KeyHandle` protocol directly over a private key
object. It is the test stand-in for hand-made keys (CA keys that sign crafted CertReps, keys
whose public key must differ); enrollment tests also run with the real key stores.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

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
class CertAndKey:
    cert: x509.Certificate
    key: CryptoKeyHandle


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, *, issuer: CertAndKey | None = None, ca: bool = False,
              key_usage: dict[str, bool] | None = None,
              key: CryptoKeyHandle | None = None, days: int = 30) -> CertAndKey:
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
    return CertAndKey(cert, key)


def make_ca(cn: str = "Test SCEP CA") -> CertAndKey:
    return make_cert(cn, ca=True, key_usage={"digital_signature": True, "key_cert_sign": True,
                                             "crl_sign": True})


def make_ndes_like(cn: str = "Test Issuing CA") -> tuple[CertAndKey, CertAndKey, CertAndKey]:
    """An NDES-style set: the CA, an RA signing cert and a separate RA encryption cert."""
    ca = make_ca(cn)
    ra_sign = make_cert("NDES RA Sign", issuer=ca, key_usage={"digital_signature": True})
    ra_enc = make_cert("NDES RA Encrypt", issuer=ca, key_usage={"key_encipherment": True})
    return ca, ra_sign, ra_enc


# --- the server side of SCEP, for crafted replies -------------------------------------------

@dataclass
class ParsedRequest:
    """A pkiMessage as a CA sees it after verifying and decrypting it."""

    message_type: int
    transaction_id: str
    sender_nonce: bytes
    signer: x509.Certificate
    digest_alg: HashAlg
    message_data: bytes  # the decrypted pkcsPKIEnvelope content (CSR, IssuerAndSubject, ...)
    cipher: str  # asn1crypto name of the request's content cipher


def parse_request(der: bytes, ra: CertAndKey) -> ParsedRequest:
    """Verify a request with the certificate it carries and decrypt it with the RA key."""
    from asn1crypto import cms as acms
    from asn1crypto import core

    from agent.scep import cms as scms
    from agent.scep import messages as m

    info = acms.ContentInfo.load(der)
    signer = x509.load_der_x509_certificate(info["content"]["certificates"][0].chosen.dump())
    verified = scms.verify_signed_data(der, [signer], "the request")
    attrs = verified.attributes

    def text(oid: str) -> str:
        return str(scms.as_type(attrs[oid], core.PrintableString).native)

    env = acms.ContentInfo.load(verified.content)
    cipher = env["content"]["encrypted_content_info"]["content_encryption_algorithm"][
        "algorithm"].native
    data = scms.open_envelope(verified.content, ra.key, ra.cert)
    return ParsedRequest(int(text(m.OID_MESSAGE_TYPE)), text(m.OID_TRANSACTION_ID),
                         scms.as_type(attrs[m.OID_SENDER_NONCE], core.OctetString).native,
                         signer, verified.digest_alg, data, cipher)


def issue_from_csr(csr_der: bytes, ca: CertAndKey, *, public_key: PublicKey | None = None,
                   days: int = 30) -> x509.Certificate:
    """What a CA does with a CSR; `public_key` overrides the key (a hostile CA)."""
    csr = x509.load_der_x509_csr(csr_der)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(csr.subject).issuer_name(ca.cert.subject)
               .public_key(public_key or csr.public_key())  # type: ignore[arg-type]
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=days)))
    return builder.sign(ca.key.key, hashes.SHA256())  # type: ignore[arg-type]


def make_cert_rep(req: ParsedRequest, signer: CertAndKey, *, status: int = 0,
                  fail_info: int | None = None, certs: tuple[x509.Certificate, ...] = (),
                  cipher: str = "des-cbc", digest: HashAlg = HashAlg.SHA1,
                  oaep: HashAlg | None = None, message_type: str = "3",
                  transaction_id: str | None = None, recipient_nonce: bytes | None = None,
                  omit: tuple[str, ...] = (), fail_text: str = "",
                  content: bytes | None = None) -> bytes:
    """A CertRep for `req`, signed by `signer`, with any field overridden or omitted."""
    import os

    from asn1crypto import core

    from agent.scep import cms as scms
    from agent.scep import messages as m
    from agent.scep.capabilities import ContentCipher

    if content is None:
        content = b""
        if status == 0:
            inner = scms.degenerate_certs_only(list(certs))
            content = scms.envelope(inner, req.signer, ContentCipher(cipher), oaep=oaep)
    values = {
        m.OID_MESSAGE_TYPE: core.PrintableString(message_type),
        m.OID_PKI_STATUS: core.PrintableString(str(status)),
        m.OID_TRANSACTION_ID: core.PrintableString(transaction_id if transaction_id
                                                   is not None else req.transaction_id),
        m.OID_RECIPIENT_NONCE: core.OctetString(recipient_nonce if recipient_nonce
                                                is not None else req.sender_nonce),
        m.OID_SENDER_NONCE: core.OctetString(os.urandom(16)),
    }
    if fail_info is not None:
        values[m.OID_FAIL_INFO] = core.PrintableString(str(fail_info))
    if fail_text:
        values[m.OID_FAIL_INFO_TEXT] = core.UTF8String(fail_text)
    attrs = [scms.attribute(oid, v) for oid, v in values.items() if oid not in omit]
    return scms.sign_data(content, signer_cert=signer.cert, handle=signer.key, digest_alg=digest,
                          attributes=attrs, signing_time=dt.datetime.now(dt.UTC))


def resign(body: bytes, signer: CertAndKey, *, changes: dict[str, object] | None = None,
           content: bytes | None = None, digest: HashAlg = HashAlg.SHA1) -> bytes:
    """Re-sign a real CertRep with `signer`, replacing (or, with None, dropping) attributes."""
    from asn1crypto import cms as acms

    from agent.scep import cms as scms

    info = acms.ContentInfo.load(body)
    signed = info["content"]
    si = signed["signer_infos"][0]
    keep = {"1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4", "1.2.840.113549.1.9.5"}
    attrs = {a["type"].dotted: a["values"][0] for a in si["signed_attrs"]
             if a["type"].dotted not in keep}
    for oid, value in (changes or {}).items():
        if value is None:
            attrs.pop(oid, None)
        else:
            attrs[oid] = value  # type: ignore[assignment]
    econtent = signed["encap_content_info"]["content"]
    data = content if content is not None else (
        b"" if econtent.native is None else bytes(econtent.native))
    return scms.sign_data(data, signer_cert=signer.cert, handle=signer.key, digest_alg=digest,
                          attributes=[scms.attribute(o, v) for o, v in attrs.items()],
                          signing_time=dt.datetime.now(dt.UTC))


def load_depot_ca(depot: object) -> CertAndKey:
    """The micromdm depot's CA certificate and key (the key is PEM with an empty password)."""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization

    path = Path(str(depot))
    cert = x509.load_pem_x509_certificate((path / "ca.pem").read_bytes())
    key = serialization.load_der_private_key(_legacy_pem_decrypt((path / "ca.key").read_bytes(),
                                                                 b""), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return CertAndKey(cert, CryptoKeyHandle(key))


def _legacy_pem_decrypt(pem: bytes, password: bytes) -> bytes:
    """OpenSSL's legacy `Proc-Type: 4,ENCRYPTED` PEM (EVP_BytesToKey/MD5, DES-EDE3-CBC).

    micromdm writes its CA key that way with an empty password, which `cryptography` refuses
    to use; the test needs the key to sign crafted CertReps.
    """
    import base64
    import hashlib

    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    lines = pem.decode().strip().splitlines()
    headers = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]
                                                     if ":" in ln)}
    body = base64.b64decode("".join(ln for ln in lines[1:-1] if ":" not in ln and ln))
    if "DEK-Info" not in headers:
        return body
    alg, iv_hex = headers["DEK-Info"].split(",")
    assert alg == "DES-EDE3-CBC", alg
    iv = bytes.fromhex(iv_hex)
    key, block = b"", b""
    while len(key) < 24:
        block = hashlib.md5(block + password + iv[:8]).digest()  # the format's KDF
        key += block
    dec = Cipher(TripleDES(key[:24]), modes.CBC(iv)).decryptor()
    plain = dec.update(body) + dec.finalize()
    return plain[:-plain[-1]]


def to_ber(der: bytes, chunk: int = 7) -> bytes:
    """Re-encode DER the way Go's pkcs7 does: indefinite lengths on constructed values,
    long OCTET STRINGs (and primitive [0] IMPLICIT OCTET STRINGs) split into constructed
    chunks. Certificates are copied verbatim (they are signed DER)."""
    from asn1crypto.core import OctetString

    from agent.scep.cms import ber_elements

    out = bytearray()
    for cls, method, tag, contents, full in ber_elements(der):
        if method == 1 and _is_certificate(full):
            out += full
        elif method == 1:
            out += bytes([full[0]]) + b"\x80" + to_ber(contents, chunk) + b"\x00\x00"
        elif ((cls == 0 and tag == 4) or (cls == 2 and tag == 0)) and len(contents) > chunk:
            pieces = b"".join(OctetString(contents[i:i + chunk]).dump()
                              for i in range(0, len(contents), chunk))
            out += bytes([full[0] | 0x20]) + b"\x80" + pieces + b"\x00\x00"
        else:
            out += full
    return bytes(out)


def _is_certificate(full: bytes) -> bool:
    try:
        x509.load_der_x509_certificate(full)
    except ValueError:
        return False
    return True


# --- a real HTTP server on 127.0.0.1 in front of a SCEP server --------------------------------

class ScepProxy:
    """A loopback HTTP server that forwards SCEP operations to `upstream` and lets a test
    replace or rewrite the replies (hostile-reply tests) or just see what the client sent.

    `on_pki(request_der, real_reply) -> Reply` decides the PKIOperation answer; `requests`
    records (method, path?query, headers) of everything received.
    """

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        self.upstream = upstream
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.on_pki: Any = None
        self.on_get: Any = None  # (operation) -> Reply | None to override GetCACaps/GetCACert
        self.bare_only = False  # 404 for .../pkiclient.exe, as micromdm answers
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                proxy._handle(self, self.rfile.read(length))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/scep"

    def start(self) -> ScepProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, operation: str) -> int:
        return sum(f"operation={operation}" in path for _, path, _ in self.requests)

    def _forward(self, method: str, query: str, body: bytes) -> tuple[int, str, bytes]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.upstream}?{query}", data=body or None,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read()

    def _handle(self, h: Any, body: bytes) -> None:
        import base64
        import urllib.parse

        path, _, query = h.path.partition("?")
        self.requests.append((h.command, h.path, dict(h.headers.items())))
        if self.bare_only and path.endswith("pkiclient.exe"):
            Reply(b"404 page not found\n", 404, "text/plain").send(h)
            return
        params = urllib.parse.parse_qs(query)
        operation = params.get("operation", [""])[0]
        if operation == "PKIOperation":
            request_der = body or base64.b64decode(params.get("message", [""])[0])
            status, ctype, real = self._forward(h.command, query, body)
            reply = (self.on_pki(request_der, real) if self.on_pki and status == 200
                     else Reply(real, status, ctype))
        else:
            override = self.on_get(operation) if self.on_get else None
            if override is None:
                status, ctype, data = self._forward("GET", query, b"")
                override = Reply(data, status, ctype)
            reply = override
        reply.send(h)


@dataclass
class Reply:
    """How the proxy answers: a body, or a crafted transport-level misbehaviour."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/x-pki-message"
    declared_length: int | None = None  # Content-Length to announce (None: the real one)
    chunked_total: int = 0  # stream this many filler bytes with chunked encoding instead
    close_after_body: bool = False

    def send(self, h: Any) -> None:
        h.send_response(self.status)
        h.send_header("Content-Type", self.content_type)
        if self.chunked_total:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            block = b"\x04" * 65536
            sent = 0
            try:
                while sent < self.chunked_total:
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    sent += len(block)
                h.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should
            h.close_connection = True
            return
        h.send_header("Content-Length", str(self.declared_length if self.declared_length
                                            is not None else len(self.body)))
        if self.close_after_body:
            h.send_header("Connection", "close")
        h.end_headers()
        try:
            h.wfile.write(self.body)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if self.close_after_body or self.declared_length is not None:
            h.close_connection = True
