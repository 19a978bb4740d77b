"""The OMA-DM HTTP transport against a real HTTPS server on 127.0.0.1 (test CA from
`cryptography`): the Windows request line and headers, TLS verification, mutual TLS, and the
HRESULT of each failure. Also holds the small scripted DM server the other omadm tests use."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.diagnostics import HResult
from agent.errors import PeerError, UnreachableError
from agent.syncml import codec
from agent.syncml.messages import Command, Status, SyncHdr, SyncMLMessage, command_name
from agent.transport import HttpTransport, TransportOptions, management_url
from tests.conftest import free_port

SYNCML = "application/vnd.syncml.dm+xml"


# --- a test PKI ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that did not issue the server certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server
                    else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("dmagent test root")
    srv_key, srv = _leaf(ca_key, ca, "127.0.0.1", server=True)
    cli_key, cli = _leaf(ca_key, ca, "device-8B2A9C1E", server=False)
    _, other = _ca("somebody else's root")
    pem = serialization.Encoding.PEM
    pki = Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
              d / "client.key", d / "other-ca.pem")
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.other_ca.write_bytes(other.public_bytes(pem))
    pki.server_cert.write_bytes(srv.public_bytes(pem))
    pki.client_cert.write_bytes(cli.public_bytes(pem))
    _write_key(pki.server_key, srv_key)
    _write_key(pki.client_key, cli_key)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- a scripted HTTPS server ---------------------------------------------------------------

@dataclass
class Request:
    request_line: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer_cert: dict[str, Any] | None


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = SYNCML
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunked: bool = False


Handler = Callable[[Request], Reply]


class HttpsServer:
    """ThreadingHTTPServer with TLS on 127.0.0.1; every request is recorded and answered by
    `handler` (a test sets it)."""

    def __init__(self, pki: Pki, *, require_client_cert: bool = False) -> None:
        self.requests: list[Request] = []
        self.handler: Handler = lambda req: Reply()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(pki.ca)
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                getpeercert = getattr(self.connection, "getpeercert", None)
                req = Request(self.requestline, self.path, dict(self.headers.items()), body,
                              getpeercert() if getpeercert else None)
                outer.requests.append(req)
                reply = outer.handler(req)
                if reply.delay:
                    time.sleep(reply.delay)
                self.send_response(reply.status)
                if reply.content_type:
                    self.send_header("Content-Type", reply.content_type)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(reply.body), 65536):
                        part = reply.body[i:i + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def https_server(pki: Pki) -> Iterator[HttpsServer]:
    server = HttpsServer(pki)
    yield server
    server.stop()


class ScriptedDMServer:
    """The smallest OMA-DM server a session needs: it answers each client message with the
    Status for the client's SyncHdr and commands, then the next batch of `script` (nothing
    once the script is done, which ends the session)."""

    def __init__(self, script: list[list[Command]] | None = None, *,
                 header_code: int = 200) -> None:
        self.script = list(script or [])
        self.header_code = header_code
        self.received: list[SyncMLMessage] = []
        self.msg_id = 0

    def __call__(self, req: Request) -> Reply:
        msg = codec.decode(req.body)
        self.received.append(msg)
        self.msg_id += 1
        h = msg.header
        body: list[Command] = [Status("1", h.msg_id, "0", "SyncHdr", self.header_code)]
        for cmd in msg.body:
            if not isinstance(cmd, Status):
                body.append(Status(str(len(body) + 1), h.msg_id, cmd.cmd_id or "",
                                   command_name(cmd), 200))
        if self.script:
            body += self.script.pop(0)
        out = SyncMLMessage(SyncHdr(h.session_id, str(self.msg_id), h.source, h.target),
                            tuple(body))
        return Reply(body=codec.encode(out))


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("addr,expected", [
    ("https://mdm.example/omadm/cimhandler.ashx",
     "https://mdm.example/omadm/cimhandler.ashx?mode=Maintenance&Platform=WoA"),
    ("https://mdm.example/dm?tenant=42", "https://mdm.example/dm?tenant=42&mode=Maintenance&"
                                          "Platform=WoA"),
    ("https://mdm.example/dm?Mode=Machine", "https://mdm.example/dm?Mode=Machine&Platform=WoA"),
    ("https://mdm.example:8443/", "https://mdm.example:8443/?mode=Maintenance&Platform=WoA"),
])
def test_management_url(addr: str, expected: str) -> None:
    assert management_url(addr) == expected


def _post(url: str, body: bytes, **options: Any) -> bytes:
    async def go() -> bytes:
        async with HttpTransport(TransportOptions(**options)) as t:
            return await t.post(url, body)
    return asyncio.run(go())


def test_windows_request_line_and_headers(https_server: HttpsServer, pki: Pki) -> None:
    https_server.handler = lambda req: Reply(body=b"<SyncML/>",
                                             content_type=SYNCML + "; charset=utf-8")
    url = management_url(https_server.base + "/omadm/cimhandler.ashx")
    assert _post(url, b"<SyncML>1</SyncML>", ca_bundle=str(pki.ca)) == b"<SyncML/>"
    (req,) = https_server.requests
    assert req.request_line == ("POST /omadm/cimhandler.ashx?mode=Maintenance&Platform=WoA "
                                "HTTP/1.1")
    headers = {k.lower(): v for k, v in req.headers.items()}
    assert headers["content-type"] == SYNCML
    assert headers["accept"] == SYNCML
    assert headers["user-agent"] == "MSFT OMA DM Client/1.2.0.1"
    assert req.body == b"<SyncML>1</SyncML>"


@pytest.mark.parametrize("bundle", ["", "other"])
def test_tls_is_verified_by_default(https_server: HttpsServer, pki: Pki, bundle: str) -> None:
    with pytest.raises(UnreachableError) as info:
        _post(https_server.base + "/dm", b"x",
              ca_bundle=str(pki.other_ca) if bundle else "")
    assert info.value.hresult == HResult.WINHTTP_SECURE_FAILURE  # 0x80072F8F
    assert "not trusted" in info.value.message
    assert info.value.exit_code == 4
    assert https_server.requests == []  # nothing was sent to an unverified server


def test_tls_verification_can_be_turned_off(https_server: HttpsServer) -> None:
    _post(https_server.base + "/dm", b"x", verify_tls=False)
    assert len(https_server.requests) == 1


def test_mutual_tls_presents_the_client_certificate(pki: Pki) -> None:
    server = HttpsServer(pki, require_client_cert=True)
    try:
        with pytest.raises(UnreachableError):
            _post(server.base + "/dm", b"x", ca_bundle=str(pki.ca))
        _post(server.base + "/dm", b"x", ca_bundle=str(pki.ca),
              client_cert=str(pki.client_cert), client_key=str(pki.client_key))
        (req,) = server.requests
        assert req.peer_cert is not None
        assert dict(x[0] for x in req.peer_cert["subject"])["commonName"] == "device-8B2A9C1E"
    finally:
        server.stop()


@pytest.mark.parametrize("reply,error,hresult,text", [
    (Reply(404, b"no such endpoint", "text/plain"), UnreachableError,
     HResult.HTTP_E_STATUS_NOT_FOUND, "HTTP 404"),
    (Reply(500, b"boom", "text/plain"), UnreachableError, HResult.HTTP_E_STATUS_SERVER_ERROR,
     "HTTP 500 for https://127.0.0.1"),
    (Reply(429, b"", "", {"Retry-After": "120"}), UnreachableError, 0x801901AD,
     "Retry-After: 120"),
    (Reply(302, b"", "", {"Location": "https://elsewhere/dm"}), UnreachableError, 0x8019012E,
     "HTTP 302 for https://127.0.0.1"),
    (Reply(200, b"<html>Sign in</html>", "text/html"), PeerError,
     HResult.WINHTTP_INVALID_SERVER_RESPONSE, "Content-Type text/html instead of"),
    (Reply(200, b"\x02\x00", "application/vnd.syncml.dm+wbxml"), PeerError,
     HResult.WINHTTP_INVALID_SERVER_RESPONSE, "WBXML"),
    (Reply(200, b"x" * 5000), PeerError, HResult.ERROR_MESSAGE_EXCEEDS_MAX_SIZE,
     "announces 5000 bytes"),
    (Reply(200, b"x" * 200_000, chunked=True), PeerError,
     HResult.ERROR_MESSAGE_EXCEEDS_MAX_SIZE, "sent more than 4096 bytes"),
])
def test_http_failures(https_server: HttpsServer, pki: Pki, reply: Reply, error: type,
                       hresult: int, text: str) -> None:
    https_server.handler = lambda req: reply
    with pytest.raises(error) as info:
        _post(https_server.base + "/dm", b"x", ca_bundle=str(pki.ca), max_response_bytes=4096)
    assert info.value.hresult == hresult
    assert text in info.value.message


def test_empty_200_is_an_empty_body(https_server: HttpsServer, pki: Pki) -> None:
    https_server.handler = lambda req: Reply(200, b"", "")
    assert _post(https_server.base + "/dm", b"x", ca_bundle=str(pki.ca)) == b""


def test_connection_refused() -> None:
    with pytest.raises(UnreachableError) as info:
        _post(f"https://127.0.0.1:{free_port()}/dm", b"x")
    assert info.value.hresult == HResult.WINHTTP_CANNOT_CONNECT


def test_timeout(https_server: HttpsServer, pki: Pki) -> None:
    https_server.handler = lambda req: Reply(delay=1.0)
    start = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        _post(https_server.base + "/dm", b"x", ca_bundle=str(pki.ca), timeout=0.3)
    assert info.value.hresult == HResult.WINHTTP_TIMEOUT
    assert time.monotonic() - start < 1.0
