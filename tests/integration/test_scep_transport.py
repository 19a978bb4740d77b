"""The HTTP shell against real loopback servers: TLS (verified and refused) and blocking key
handles kept off the event loop."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from agent.csr import CsrRequest
from agent.diagnostics import HResult
from agent.errors import UnreachableError
from agent.scep.client import make_http_client
from agent.scep.enroll import EnrollOptions, enroll, is_blocking
from keystores.base import HashAlg, Padding
from tests.conftest import ScepServerInstance
from tests.scep_support import CryptoKeyHandle, ScepProxy

pytestmark = pytest.mark.scepserver


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "tls.pem", tmp_path / "tls.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


@pytest.fixture
def tls_proxy(scepserver: ScepServerInstance, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert_pem, key_pem = _self_signed(tmp_path)
    proxy = ScepProxy(scepserver.url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_pem, key_pem)
    proxy._server.socket = ctx.wrap_socket(proxy._server.socket, server_side=True)
    proxy.start()
    yield proxy.url.replace("http://", "https://"), cert_pem
    proxy.stop()


def _options(url: str) -> EnrollOptions:
    return EnrollOptions(url, CsrRequest(subject="CN=tls-device", challenge="secret"))


def test_untrusted_tls_is_winhttp_secure_failure(tls_proxy: tuple[str, Path]) -> None:
    url, _ = tls_proxy
    with pytest.raises(UnreachableError) as err:
        asyncio.run(enroll(_options(url), CryptoKeyHandle.rsa()))
    assert err.value.hresult == HResult.WINHTTP_SECURE_FAILURE == 0x80072F8F
    assert "server certificate is not trusted (self-signed certificate)" in err.value.message


def test_trusted_tls_enrolls(tls_proxy: tuple[str, Path]) -> None:
    url, cert_pem = tls_proxy
    trust = ssl.create_default_context(cafile=str(cert_pem))

    async def main() -> str:
        async with make_http_client(verify=trust) as http:
            key = CryptoKeyHandle.rsa()
            result = await enroll(_options(url), key, http=http)
            return result.respondent_url

    assert asyncio.run(main()).startswith("https://127.0.0.1:")


class BlockingHandle(CryptoKeyHandle):
    """A key whose operations block (like a TPM's): they must not run on the event loop."""

    blocking = True

    def __init__(self) -> None:
        super().__init__(rsa.generate_private_key(65537, 2048))
        self.threads: list[str] = []

    def sign(self, data: bytes, hash_alg: HashAlg, padding_: Padding = Padding.PKCS1V15) -> bytes:
        self.threads.append(threading.current_thread().name)
        return super().sign(data, hash_alg, padding_)

    def decrypt(self, ciphertext: bytes, padding_: Padding = Padding.PKCS1V15,
                oaep_hash: HashAlg = HashAlg.SHA1) -> bytes:
        self.threads.append(threading.current_thread().name)
        return super().decrypt(ciphertext, padding_, oaep_hash)


def test_blocking_key_operations_run_in_worker_threads(scepserver: ScepServerInstance) -> None:
    key = BlockingHandle()
    assert is_blocking(key)
    loop_thread: list[str] = []

    async def main() -> None:
        loop_thread.append(threading.current_thread().name)
        await enroll(_options(scepserver.url), key)

    asyncio.run(main())
    assert len(key.threads) >= 4  # CSR, transient cert, SignedData, CEK decryption
    assert loop_thread[0] not in key.threads


def test_software_handles_stay_inline() -> None:
    assert not is_blocking(CryptoKeyHandle.rsa(1024))
