"""The HTTP shell against real loopback servers: TLS (verified and refused), blocking key
handles kept off the event loop, and the blocking transport of one-shot commands meeting the
same servers (well-behaved and not) with the same outcome as the httpx one."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from agent.config import ScepConfig
from agent.csr import CsrRequest
from agent.diagnostics import HResult
from agent.errors import DmAgentError, PeerError, UnreachableError
from agent.scep.client import ScepClient, make_blocking_http, make_http_client
from agent.scep.enroll import EnrollOptions, enroll, enroll_inline, is_blocking
from agent.scep.inline import run_inline
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


# --- the blocking transport (dmagent scep) against the httpx one, same failures -------------

def _inline(url: str, key: Any, *, verify: bool | str | ssl.SSLContext = True) -> str:
    with make_blocking_http(verify=verify) as http:
        return enroll_inline(_options(url), key, http=http).respondent_url


def test_untrusted_tls_fails_alike_without_a_loop(tls_proxy: tuple[str, Path]) -> None:
    url, _ = tls_proxy
    with pytest.raises(UnreachableError) as inline:
        _inline(url, CryptoKeyHandle.rsa())
    with pytest.raises(UnreachableError) as looped:
        asyncio.run(enroll(_options(url), CryptoKeyHandle.rsa()))
    assert inline.value.hresult == looped.value.hresult == HResult.WINHTTP_SECURE_FAILURE
    assert inline.value.message == looped.value.message
    assert inline.value.advice == looped.value.advice


@pytest.mark.parametrize("how", ["context", "cafile", "insecure"])
def test_trusted_tls_enrolls_without_a_loop(tls_proxy: tuple[str, Path], how: str) -> None:
    url, cert_pem = tls_proxy
    choices: dict[str, bool | str | ssl.SSLContext] = {
        "context": ssl.create_default_context(cafile=str(cert_pem)),
        "cafile": str(cert_pem), "insecure": False}
    verify = choices[how]
    assert _inline(url, CryptoKeyHandle.rsa(), verify=verify).startswith("https://127.0.0.1:")


def test_blocking_key_operations_run_inline_without_a_loop(
        scepserver: ScepServerInstance) -> None:
    key = BlockingHandle()
    _inline(scepserver.url, key)
    assert set(key.threads) == {threading.current_thread().name}


class CannedServer:
    """A loopback HTTP/1.1 server answering raw bytes chosen per request path, to make each
    transport meet the same misbehaving server. Counts the connections it accepted."""

    def __init__(self, answer: Callable[[str], bytes | None]) -> None:
        self.answer = answer  # path?query -> raw response (None: close without answering)
        self.connections = 0
        self.close_after_each = False  # close after answering, without "Connection: close"
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/scep"
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(v) for k, _, v in (h.partition(": ") for h in lines[1:])
                               if k.lower() == "content-length"), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                reply = self.answer(lines[0].split(" ")[1])
                if reply is None:
                    return
                conn.sendall(reply)
                if self.close_after_each or b"Connection: close" in reply:
                    return

    def stop(self) -> None:
        self._stop = True
        self._sock.close()


def _ok(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def _redirect(location: str, status: int = 302) -> bytes:
    return f"HTTP/1.1 {status} Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()


CAPS = b"POSTPKIOperation\nSHA-256\nAES\n"
CANNED: dict[str, tuple[Callable[[str], bytes | None], type | None, int | None, str]] = {
    "redirect followed": (lambda p: _ok(CAPS) if p.startswith("/moved") else _redirect(
        "/moved" + p[len("/scep"):]), None, None, ""),
    "chunked body": (lambda p: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"5\r\nPOSTP\r\nb\r\nKIOperation\r\n0\r\n\r\n"), None, None, ""),
    "chunk extension and trailer": (
        lambda p: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nPOSTP\r\n"
                   b"b\r\nKIOperation\r\n0\r\nX-Trailer: y\r\n\r\n"), None, None, ""),
    "body until the connection closes": (
        lambda p: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + CAPS, None, None, ""),
    "HTTP/1.0 server": (lambda p: b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                                  b"Connection: close\r\n\r\n" + CAPS, None, None, ""),
    "interim 100 Continue": (lambda p: b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(CAPS),
                             None, None, ""),
    "status line garbage": (lambda p: b"HTTP/1.1 OK 200\r\nContent-Length: 0\r\n\r\n",
                            UnreachableError, HResult.WINHTTP_INVALID_SERVER_RESPONSE,
                            "broke the HTTP protocol"),
    "Content-Lengths differ": (lambda p: b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n"
                                         b"Content-Length: 5\r\n\r\nPOSTP",
                               UnreachableError, HResult.WINHTTP_INVALID_SERVER_RESPONSE,
                               "broke the HTTP protocol"),
    "redirect loop": (_redirect, UnreachableError,
                      HResult.HTTP_E_STATUS_UNEXPECTED_REDIRECTION, "redirects too many times"),
    "redirect to ftp": (lambda p: _redirect("ftp://127.0.0.1/scep"), PeerError,
                        HResult.E_INVALIDARG, "is not a usable URL"),
    "3xx without Location": (lambda p: b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n",
                             UnreachableError, 0x8019012E, "answered HTTP 302"),
    "not HTTP": (lambda p: b"SSH-2.0-OpenSSH_9.6\r\n\r\n", UnreachableError,
                 HResult.WINHTTP_INVALID_SERVER_RESPONSE, "broke the HTTP protocol"),
    "closed without answer": (lambda p: None, UnreachableError,
                              HResult.WINHTTP_INVALID_SERVER_RESPONSE, "broke the HTTP protocol"),
    "body cut short": (lambda p: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
                                 b"Connection: close\r\n\r\nPOST", PeerError,
                       HResult.WINHTTP_CONNECTION_ERROR, "truncated: the connection ended after "
                                                         "4 bytes of the 100 announced"),
    "404 with body": (lambda p: b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here\n",
                      UnreachableError, HResult.HTTP_E_STATUS_NOT_FOUND,
                      "answered HTTP 404 for {url}?operation=GetCACaps: not here"),
}


async def _caps(url: str, http: Any) -> tuple[bytes, str]:
    async with ScepClient(url, ScepConfig(windows_url_form=False), http=http) as client:
        caps = await client.get_ca_caps()
        return b"\n".join(w.encode() for w in caps.keywords), client.respondent_url


@pytest.mark.parametrize("case", list(CANNED))
def test_both_transports_meet_a_server_alike(case: str) -> None:
    answer, etype, hresult, text = CANNED[case]
    server = CannedServer(answer)
    try:
        outcomes = []
        for inline in (True, False):
            try:
                if inline:
                    with make_blocking_http() as http:
                        got: object = run_inline(_caps(server.url, http))
                else:
                    async def looped() -> tuple[bytes, str]:
                        async with make_http_client() as http:
                            return await _caps(server.url, http)

                    got = asyncio.run(looped())
            except DmAgentError as exc:
                got = exc
            outcomes.append(got)
    finally:
        server.stop()
    inline_got, looped_got = outcomes
    if etype is None:
        assert inline_got == looped_got
        assert isinstance(inline_got, tuple) and b"POSTPKIOperation" in inline_got[0]
        assert inline_got[1] == server.url  # the URL asked, not where it was redirected
        return
    for err in (inline_got, looped_got):
        assert type(err) is etype, err
        assert isinstance(err, DmAgentError)
        assert err.hresult == hresult, err.message
        assert text.format(url=server.url) in err.message
    assert isinstance(inline_got, DmAgentError) and isinstance(looped_got, DmAgentError)
    assert inline_got.advice == looped_got.advice


def test_blocking_transport_keeps_one_connection() -> None:
    server = CannedServer(lambda p: _ok(CAPS))
    try:
        with make_blocking_http() as http:
            for _ in range(3):
                run_inline(_caps(server.url, http))
        assert server.connections == 1
        server.close_after_each = True  # idle connections the server closed are replaced
        with make_blocking_http() as http:
            for _ in range(3):
                run_inline(_caps(server.url, http))
        assert server.connections == 1 + 3
    finally:
        server.stop()
