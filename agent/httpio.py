"""What both HTTP shells (the OMA-DM transport and the SCEP client) share: a lean `httpx`
import, bodies read with a cap, and HTTP/transport failures turned into the HRESULTs WinHTTP
reports. Each shell says who its peer is and which setting caps it; the wording follows.

`BlockingHttp` (at the end) is a third, small shell: HTTP/1.1 on blocking sockets
(`agent.http11` frames the messages) for one-shot commands that send one request after another
(`dmagent scep ...`). It reports failures through the same helpers, hence with the same
HRESULTs and wording; `ssl` is imported only for an https URL.
httpx is imported on first use (`from agent.httpio import httpx`, or a helper given an httpx
object), not with this module, so such a command never loads httpx, httpcore and anyio.
"""

from __future__ import annotations

import socket
import sys
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import http11
from agent.diagnostics import HResult, hresult_from_http_status
from agent.errors import ConfigError, DmAgentError, PeerError, UnreachableError

if TYPE_CHECKING:
    import ssl
    from urllib.parse import SplitResult

    import httpx


def _skip_httpx_cli() -> None:
    """Keep `import httpx` from importing httpx's command-line tool.

    httpx/__init__ imports `httpx._main` (the `httpx` console command) whenever rich and click
    are installed, and rich is one of our dependencies: ~50 ms of every `dmagent` start spent
    on a tool nothing here calls. A stand-in module with the same `main` name is registered
    only if httpx has not been imported yet; `httpx.main` then says what happened.
    """
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    stub = types.ModuleType("httpx._main")

    def main(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the httpx command-line tool is not loaded inside dmagent")

    stub.main = main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = stub


def _httpx() -> types.ModuleType:
    """httpx, imported without its command-line tool (once; later calls are a dict lookup)."""
    if "httpx" not in sys.modules:
        _skip_httpx_cli()
    import httpx

    return httpx


def __getattr__(name: str) -> Any:
    """`from agent.httpio import httpx` imports httpx (lean) at that point (PEP 562)."""
    if name == "httpx":
        return _httpx()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SNIPPET", "Peer", "bad_url", "http_status_error", "httpx", "read_capped",
           "read_snippet", "too_large", "too_many_redirects", "transport_error", "truncated"]

SNIPPET = 512  # bytes of an error body kept for the message


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, for messages and advice."""

    name: str  # "the MDM server", "the SCEP server"
    limit_setting: str  # the config key that caps a response
    timeout_setting: str
    http_advice: dict[int, str] = field(default_factory=dict)
    too_large_advice: str = ""
    bad_url_is_config: bool = True  # a bad URL: our configuration, or (SCEP) the profile's


async def read_snippet(resp: httpx.Response, limit: int = SNIPPET) -> bytes:
    """The start of an error body, for the message (errors while reading are ignored)."""
    httpx = _httpx()
    buf = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) >= limit:
                break
    except httpx.HTTPError:
        pass
    return bytes(buf[:limit])


async def read_capped(resp: httpx.Response, url: str, limit: int, peer: Peer) -> bytes:
    """The whole body, refused as soon as it announces or passes `limit` bytes, so a huge
    reply is never buffered; a connection cut short is a precise error."""
    httpx = _httpx()
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(url, f"announces {int(declared)} bytes", limit, peer)
    buf = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise too_large(url, f"sent more than {limit} bytes", limit, peer)
    except httpx.RemoteProtocolError as exc:
        raise truncated(url, len(buf), declared, exc) from None
    return bytes(buf)


def truncated(url: str, got: int, declared: str, exc: BaseException) -> PeerError:
    """A body that ended before its end (Content-Length or chunked framing)."""
    return PeerError(
        f"the response from {url} is truncated: the connection ended after {got} "
        f"bytes" + (f" of the {declared} announced" if declared else "") + f" ({exc})",
        hresult=HResult.WINHTTP_CONNECTION_ERROR,
        advice="the server or a proxy cut the response short")


def http_status_error(status: int, url: str, snippet: bytes, peer: Peer,
                      headers: httpx.Headers | None = None) -> UnreachableError:
    """HTTP error statuses are what Windows reports as 0x80190000 + status."""
    text = snippet.decode("utf-8", "replace").strip().splitlines()
    detail = f": {text[0][:200]}" if text else ""
    if headers is not None:
        if 300 <= status < 400 and headers.get("location"):
            detail = f" to {headers['location']}"
        if status == 429 and headers.get("retry-after"):
            detail += f" (Retry-After: {headers['retry-after']})"
    try:
        hr = hresult_from_http_status(status)
    except ValueError:
        hr = HResult.HTTP_E_STATUS_UNEXPECTED
    return UnreachableError(f"{peer.name} answered HTTP {status} for {url}{detail}",
                            hresult=hr, advice=peer.http_advice.get(status, ""))


def too_large(url: str, what: str, limit: int, peer: Peer) -> PeerError:
    return PeerError(f"the response from {url} {what}; the limit is {limit} bytes "
                     f"({peer.limit_setting})", hresult=HResult.ERROR_MESSAGE_EXCEEDS_MAX_SIZE,
                     advice=peer.too_large_advice)


def bad_url(url: str, why: object, peer: Peer) -> DmAgentError:
    kind = ConfigError if peer.bad_url_is_config else PeerError
    return kind(f"{url} is not a usable URL: {why}", hresult=HResult.E_INVALIDARG)


def too_many_redirects(url: str) -> UnreachableError:
    return UnreachableError(f"{url} redirects too many times",
                            hresult=HResult.HTTP_E_STATUS_UNEXPECTED_REDIRECTION)


def transport_error(exc: httpx.HTTPError | OSError | Exception, url: str, peer: Peer, *,
                    connecting: bool = False) -> DmAgentError:
    """WinHTTP's view of a transport failure (HRESULT_FROM_WIN32(ERROR_WINHTTP_*)).

    `exc` is an httpx error, or for `BlockingHttp` an OSError / http11.ProtocolError
    (`connecting`: raised while the connection was being made).
    """
    hx = sys.modules.get("httpx")  # an httpx error means httpx is loaded; never import it here
    tls = sys.modules.get("ssl")  # likewise a TLS error and ssl
    if isinstance(exc, TimeoutError) or (hx is not None and isinstance(exc, hx.TimeoutException)):
        # before the causes: a TLS read can time out
        return UnreachableError(f"{url} did not answer in time ({type(exc).__name__})",
                                hresult=HResult.WINHTTP_TIMEOUT,
                                advice=f"raise {peer.timeout_setting} or check the server")
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return UnreachableError(f"cannot resolve the host of {url}: {cause.strerror}",
                                    hresult=HResult.WINHTTP_NAME_NOT_RESOLVED)
        if tls is not None and isinstance(cause, tls.SSLCertVerificationError):
            why = (getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
                   or str(cause))
            return UnreachableError(
                f"TLS with {url} failed: the server certificate is not trusted ({why})",
                hresult=HResult.WINHTTP_SECURE_FAILURE,
                advice="put the server's root CA in the trusted bundle (server.ca_bundle)")
        if tls is not None and isinstance(cause, tls.SSLError):
            reason = str(getattr(cause, "reason", None) or cause)
            client_side = any(k in reason for k in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE",
                                                    "UNKNOWN_CA", "CERTIFICATE_UNKNOWN"))
            return UnreachableError(
                f"TLS with {url} failed: {reason}", hresult=HResult.WINHTTP_SECURE_FAILURE,
                advice="the server refused the client certificate: check server.client_cert "
                       "and server.client_key" if client_side else
                "check the server certificate, its trust and the client certificate")
        cause = cause.__cause__ or cause.__context__
    if (connecting and isinstance(exc, OSError)) or (
            hx is not None and isinstance(exc, hx.ConnectError)):
        text = str(exc).lower()
        if "name or service" in text or "nodename" in text:
            return UnreachableError(f"cannot resolve the host of {url}: {exc}",
                                    hresult=HResult.WINHTTP_NAME_NOT_RESOLVED)
        return UnreachableError(f"cannot connect to {url}: {exc or 'connection refused'}",
                                hresult=HResult.WINHTTP_CANNOT_CONNECT,
                                advice=f"check that {peer.name} is running and reachable")
    if hx is not None:
        if isinstance(exc, hx.TooManyRedirects):
            return too_many_redirects(url)
        if isinstance(exc, hx.UnsupportedProtocol | hx.InvalidURL):
            return bad_url(url, exc, peer)
    if (hx is not None and isinstance(exc, hx.RemoteProtocolError)) or \
            isinstance(exc, http11.ProtocolError):
        return UnreachableError(f"{url} broke the HTTP protocol: {exc or type(exc).__name__}",
                                hresult=HResult.WINHTTP_INVALID_SERVER_RESPONSE)
    return UnreachableError(f"the connection to {url} failed: {exc or type(exc).__name__}",
                            hresult=HResult.WINHTTP_CONNECTION_ERROR)


# --- a blocking HTTP/1.1 client for one-shot commands -------------------------------------

_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 20  # httpx's default
_RECV_BYTES = 65536
# A kept-alive connection failing like this was closed by the server while idle: the request
# never reached it, so a GET may be sent again on a new connection.
_RETRYABLE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
              http11.ClosedBeforeResponse)

Origin = tuple[str, str, int | None]  # scheme, host, port as the URL gives them


def ssl_context(verify: bool | str | ssl.SSLContext = True) -> ssl.SSLContext:
    """The TLS context httpx builds for `verify` (trust from $SSL_CERT_FILE, $SSL_CERT_DIR,
    else certifi's bundle; False = no verification), ALPN http/1.1 as httpcore offers."""
    import os
    import ssl

    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif isinstance(verify, str):
        ctx = (ssl.create_default_context(capath=verify) if os.path.isdir(verify)
               else ssl.create_default_context(cafile=verify))
    elif os.environ.get("SSL_CERT_FILE"):
        ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    elif os.environ.get("SSL_CERT_DIR"):
        ctx = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    else:
        import certifi

        ctx = ssl.create_default_context(cafile=certifi.where())
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has seen EOF (or stray bytes): unusable."""
    import select

    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _host_field(scheme: str, host: str, port: int | None) -> str:
    """The Host header as http.client writes it: the port only when not the default."""
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return name if port in (None, 443 if scheme == "https" else 80) else f"{name}:{port}"


class BlockingHttp:
    """HTTP/1.1 with blocking sockets, one request at a time, no event loop.

    For one-shot commands: importing httpx and asyncio (or http.client, email and ssl) costs
    more than such a command's whole conversation. It behaves like the httpx clients of the
    shells: `timeout` per connect and per socket read or write, redirects followed (at most
    20; 303, and 301/302 after a POST, become a GET without body), TLS verified like httpx does
    (`ssl_context`), one keep-alive connection per origin (a reused connection the server has
    closed meanwhile is replaced once). Like the SCEP httpx client it uses no proxy. Messages
    are framed by `agent.http11`, which refuses what it does not understand. Not thread-safe.
    """

    def __init__(self, *, timeout: float, headers: dict[str, str] | None = None,
                 verify: bool | str | ssl.SSLContext = True,
                 max_redirects: int = MAX_REDIRECTS) -> None:
        self._timeout = timeout
        self._headers = {"Accept": "*/*", "Accept-Encoding": "identity", **(headers or {})}
        self._verify = verify
        self._tls: ssl.SSLContext | None = None  # built on the first https request
        self._max_redirects = max_redirects
        self._conns: dict[Origin, socket.socket] = {}

    def __enter__(self) -> BlockingHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in self._conns.values():
            sock.close()
        self._conns.clear()

    def fetch(self, method: str, url: str, *, limit: int, peer: Peer,
              content: bytes | None = None, headers: dict[str, str] | None = None,
              shown: str | None = None) -> tuple[bytes, str]:
        """One request (redirects followed): the 2xx body (at most `limit` bytes) and its
        Content-Type. Any other outcome raises the DmAgentError the httpx shells raise."""
        import urllib.parse

        shown = shown or url
        for _ in range(self._max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            origin = self._origin(parts, shown, peer)
            sock, reader, head = self._send(method, origin, parts, content, headers, shown,
                                            peer)
            try:
                status = head.status
                location = head.get("location")
                if status in _REDIRECTS and location:
                    self._body(sock, reader, SNIPPET, shown, peer, lenient=True)
                    url = urllib.parse.urljoin(url, location)
                    if (status == 303 and method != "HEAD") or (status in (301, 302)
                                                                 and method == "POST"):
                        method, content = "GET", None
                        headers = {k: v for k, v in (headers or {}).items()
                                   if k.lower() != "content-type"}
                    continue
                if not 200 <= status < 300:
                    raise http_status_error(
                        status, shown,
                        self._body(sock, reader, SNIPPET, shown, peer, lenient=True), peer)
                return (self._body(sock, reader, limit, shown, peer),
                        head.get("content-type") or "")
            finally:
                if not reader.keep_alive:  # not read to its end, or closing: unusable
                    self._drop(origin)
        raise too_many_redirects(shown)

    @staticmethod
    def _origin(parts: SplitResult, shown: str, peer: Peer) -> Origin:
        scheme = parts.scheme.lower()
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:  # a port that is not a number
            raise bad_url(shown, exc, peer) from None
        if scheme not in ("http", "https") or not host:
            raise bad_url(shown, f"{scheme or 'no'} scheme" if host else "no host", peer)
        return scheme, host, port

    def _send(self, method: str, origin: Origin, parts: SplitResult, content: bytes | None,
              headers: dict[str, str] | None, shown: str,
              peer: Peer) -> tuple[socket.socket, http11.ResponseReader, http11.ResponseHead]:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            request = http11.encode_request(method, target, _host_field(*origin),
                                            {**self._headers, **(headers or {})}, content)
        except http11.InvalidTarget as exc:
            raise bad_url(shown, exc, peer) from None
        except ValueError as exc:
            raise ConfigError(f"cannot send a request to {shown}: {exc}") from None
        while True:
            sock, reused = self._connection(origin, shown, peer)
            reader = http11.ResponseReader(method)
            try:
                sock.sendall(request)
                head = self._next(sock, reader)
            except (OSError, http11.ProtocolError) as exc:
                self._drop(origin)
                if reused and method in ("GET", "HEAD") and isinstance(exc, _RETRYABLE):
                    continue  # the server closed the idle connection: once more on a new one
                raise transport_error(exc, shown, peer) from None
            assert isinstance(head, http11.ResponseHead)  # the reader's first event
            return sock, reader, head

    def _connection(self, origin: Origin, shown: str,
                    peer: Peer) -> tuple[socket.socket, bool]:
        """The origin's connection and whether it was used before."""
        sock = self._conns.get(origin)
        if sock is not None:
            if not _closed_by_peer(sock):
                return sock, True
            self._drop(origin)  # readable while idle: the server closed it (EOF)
        try:
            sock = self._connect(*origin)
        except OSError as exc:
            raise transport_error(exc, shown, peer, connecting=True) from None
        self._conns[origin] = sock
        return sock, False

    def _connect(self, scheme: str, host: str, port: int | None) -> socket.socket:
        """A connected socket (TLS for https), resolving an ASCII host name as bytes: a str
        makes getaddrinfo load the idna codec (and unicodedata), ~2.5 ms of a command."""
        name: Any = host.encode("ascii") if host.isascii() else host  # getaddrinfo takes both
        sock = socket.create_connection(
            (name, port or (443 if scheme == "https" else 80)), self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl_context(self._verify)
                sock = self._tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _next(sock: socket.socket,
              reader: http11.ResponseReader) -> http11.ResponseHead | bytes | http11.Event:
        """The reader's next event, reading from the socket while it needs data."""
        while True:
            event = reader.next_event()
            if event is not http11.Event.NEED_DATA:
                return event
            reader.receive(sock.recv(_RECV_BYTES))

    def _drop(self, origin: Origin) -> None:
        sock = self._conns.pop(origin, None)
        if sock is not None:
            sock.close()

    def _body(self, sock: socket.socket, reader: http11.ResponseReader, limit: int, url: str,
              peer: Peer, *, lenient: bool = False) -> bytes:
        """The body, refused past `limit` (read_capped's rules); `lenient` (error bodies,
        redirects): its first `limit` bytes, read errors ignored. A body not read to its end
        leaves the reader short of its end, and `fetch` then drops the connection."""
        declared = (reader.head.get("content-length") if reader.head else None) or ""
        if not lenient and declared.isdigit() and int(declared) > limit:
            raise too_large(url, f"announces {int(declared)} bytes", limit, peer)
        buf = bytearray()
        try:
            while len(buf) <= limit:
                event = self._next(sock, reader)
                if event is http11.Event.END:
                    break
                assert isinstance(event, bytes)
                buf += event
        except http11.IncompleteBody as exc:
            if lenient:
                return bytes(buf[:limit])
            raise truncated(url, exc.received, declared, exc) from None
        except (OSError, http11.ProtocolError) as exc:
            if lenient:
                return bytes(buf[:limit])
            raise transport_error(exc, url, peer) from None
        if len(buf) > limit:
            if lenient:
                return bytes(buf[:limit])
            raise too_large(url, f"sent more than {limit} bytes", limit, peer)
        return bytes(buf)
