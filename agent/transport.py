"""HTTP transport for OMA-DM sessions: one POST per SyncML message, as the Windows client sends it.

MS-MDM §2.1: `POST <ADDR>?mode=Maintenance&Platform=WoA`, Content-Type
`application/vnd.syncml.dm+xml`, User-Agent `MSFT OMA DM Client/1.2.0.1`; the server's answer is
the HTTP response body. TLS verification is on unless the configuration turns it off; the
server's roots come from `server.ca_bundle` (else the system store); mutual TLS uses
`server.client_cert`/`client_key` (the MDM client certificate from enrollment, MS-MDM §1.5).

Failures become the agent's errors with the HRESULT WinHTTP would give: no connection, DNS, TLS
and timeouts are `UnreachableError` (0x80072Exx/0x80072Fxx), an HTTP error status is
`UnreachableError` with HTTP_E_STATUS_* (0x80190000 + status), and an answer that is not SyncML
(wrong Content-Type, too large, cut short) is `PeerError`. Bodies are never logged: they carry
challenges and certificates.

This and agent/scep/client.py are the only modules that import httpx. One `HttpTransport`
belongs to one device (its client certificate): fleets create one per device.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import types
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from agent.config import ServerConfig
from agent.diagnostics import HResult, hresult_from_http_status
from agent.errors import ConfigError, DmAgentError, PeerError, UnreachableError
from agent.syncml.messages import CONTENT_TYPE


def _skip_httpx_cli() -> None:
    """Keep `import httpx` from importing its command-line tool (rich is installed, so httpx
    would load it: tens of milliseconds of every `dmagent sync` start for nothing)."""
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    stub = types.ModuleType("httpx._main")

    def main(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the httpx command-line tool is not loaded inside dmagent")

    stub.main = main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = stub


_skip_httpx_cli()

import httpx  # noqa: E402 - after the stand-in above

log = logging.getLogger("dmagent.transport")

USER_AGENT = "MSFT OMA DM Client/1.2.0.1"
WBXML_CONTENT_TYPE = "application/vnd.syncml.dm+wbxml"
_SNIPPET = 300


class Transport(Protocol):
    """What the session shell needs: POST one message, get the response body."""

    async def post(self, url: str, body: bytes) -> bytes: ...


def management_url(addr: str, mode: str = "Maintenance", platform: str = "WoA") -> str:
    """The URL Windows posts to: ADDR plus `mode` and `Platform` (MS-MDM §2.1, note <2>),
    appended to a query ADDR may already have; parameters ADDR already sets are kept."""
    parts = urllib.parse.urlsplit(addr)
    present = {k.lower() for k, _ in urllib.parse.parse_qsl(parts.query,
                                                             keep_blank_values=True)}
    extra = [(k, v) for k, v in (("mode", mode), ("Platform", platform))
             if k.lower() not in present]
    query = "&".join(p for p in (parts.query, urllib.parse.urlencode(extra)) if p)
    return urllib.parse.urlunsplit(parts._replace(query=query))


@dataclass(frozen=True)
class TransportOptions:
    verify_tls: bool = True
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""
    timeout: float = 60.0
    max_response_bytes: int = 4 * 1024 * 1024

    @classmethod
    def from_config(cls, server: ServerConfig) -> TransportOptions:
        return cls(verify_tls=server.verify_tls, ca_bundle=server.ca_bundle,
                   client_cert=server.client_cert, client_key=server.client_key,
                   timeout=server.timeout, max_response_bytes=server.max_response_bytes)


def make_ssl_context(options: TransportOptions) -> ssl.SSLContext:
    """Server verification (system roots or `ca_bundle`) and the client certificate."""
    try:
        ctx = ssl.create_default_context(cafile=options.ca_bundle or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.ca_bundle: cannot load {options.ca_bundle}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if not options.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if options.client_cert:
        try:
            ctx.load_cert_chain(options.client_cert, options.client_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"server.client_cert: cannot load {options.client_cert}"
                              + (f" with {options.client_key}" if options.client_key else "")
                              + f": {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


class HttpTransport:
    def __init__(self, options: TransportOptions | None = None, *,
                 client: httpx.AsyncClient | None = None) -> None:
        self.options = options or TransportOptions()
        self._client = client or httpx.AsyncClient(
            verify=make_ssl_context(self.options), timeout=httpx.Timeout(self.options.timeout),
            follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1))

    async def __aenter__(self) -> HttpTransport:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post(self, url: str, body: bytes) -> bytes:
        """POST one SyncML message; the response body (b"" when the server sent none)."""
        headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE,
                   "User-Agent": USER_AGENT}
        limit = self.options.max_response_bytes
        try:
            async with self._client.stream("POST", url, content=body,
                                           headers=headers) as resp:
                status = resp.status_code
                if not 200 <= status < 300:
                    raise _http_error(status, url, await _read_some(resp), resp.headers)
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise _too_large(url, f"announces {int(declared)} bytes", limit)
                buf = bytearray()
                try:
                    async for chunk in resp.aiter_bytes():
                        buf += chunk
                        if len(buf) > limit:
                            raise _too_large(url, f"sent more than {limit} bytes", limit)
                except httpx.RemoteProtocolError as exc:
                    raise PeerError(f"the response from {url} is cut short after {len(buf)} "
                                    f"bytes ({exc})",
                                    hresult=HResult.WINHTTP_CONNECTION_ERROR) from None
                log.debug("POST %s: %d bytes -> HTTP %d, %d bytes", url, len(body), status,
                          len(buf))
                if buf.strip():
                    _check_content_type(resp.headers.get("content-type", ""), url, bytes(buf))
                return bytes(buf)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, url) from None
        except OSError as exc:
            # httpcore lets some TLS failures through unwrapped, e.g. TLS 1.3's "certificate
            # required" alert, which arrives with the first read after the handshake.
            raise _transport_error(exc, url) from None


def _check_content_type(value: str, url: str, body: bytes) -> None:
    mime = value.split(";", 1)[0].strip().lower()
    if mime == CONTENT_TYPE:
        return
    if mime == WBXML_CONTENT_TYPE:
        raise PeerError(f"{url} answered WBXML ({mime}), which the client did not accept",
                        hresult=HResult.WINHTTP_INVALID_SERVER_RESPONSE,
                        advice=f"configure the server to answer {CONTENT_TYPE}")
    snippet = body[:_SNIPPET].decode("utf-8", "replace").split("\n", 1)[0].strip()
    raise PeerError(f"{url} answered Content-Type {mime or '(none)'} instead of {CONTENT_TYPE}"
                    + (f": {snippet}" if snippet else ""),
                    hresult=HResult.WINHTTP_INVALID_SERVER_RESPONSE,
                    advice="check the server URL: it should be the OMA-DM endpoint (ADDR)")


async def _read_some(resp: httpx.Response) -> bytes:
    buf = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) >= _SNIPPET:
                break
    except httpx.HTTPError:
        pass
    return bytes(buf[:_SNIPPET])


_HTTP_ADVICE = {
    401: "the server did not accept the device (is the MDM client certificate configured: "
         "server.client_cert?)",
    403: "the server refused the device; check its enrollment on the server",
    404: "check the enrollment's server URL (ADDR)",
    429: "the server is throttling the device; sync again later",
}


def _http_error(status: int, url: str, snippet: bytes,
                headers: httpx.Headers) -> UnreachableError:
    text = snippet.decode("utf-8", "replace").strip().splitlines()
    detail = f": {text[0][:200]}" if text else ""
    if 300 <= status < 400 and headers.get("location"):
        detail = f" to {headers['location']}"
    if status == 429 and headers.get("retry-after"):
        detail += f" (Retry-After: {headers['retry-after']})"
    try:
        hr = hresult_from_http_status(status)
    except ValueError:
        hr = HResult.HTTP_E_STATUS_UNEXPECTED
    return UnreachableError(f"the MDM server answered HTTP {status} for {url}{detail}",
                            hresult=hr, advice=_HTTP_ADVICE.get(status, ""))


def _too_large(url: str, what: str, limit: int) -> PeerError:
    return PeerError(f"the response from {url} {what}; the limit is {limit} bytes "
                     "(server.max_response_bytes)",
                     hresult=HResult.ERROR_MESSAGE_EXCEEDS_MAX_SIZE,
                     advice="the client advertises its MaxMsgSize; the server must respect it")


def _transport_error(exc: httpx.HTTPError | OSError, url: str) -> DmAgentError:
    """WinHTTP's view of a transport failure (HRESULT_FROM_WIN32(ERROR_WINHTTP_*))."""
    if isinstance(exc, httpx.TimeoutException):  # before the causes: a TLS read can time out
        return UnreachableError(f"{url} did not answer in time ({type(exc).__name__})",
                                hresult=HResult.WINHTTP_TIMEOUT,
                                advice="raise server.timeout or check the server")
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return UnreachableError(f"cannot resolve the host of {url}: {cause.strerror}",
                                    hresult=HResult.WINHTTP_NAME_NOT_RESOLVED)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return UnreachableError(
                f"TLS with {url} failed: the server certificate is not trusted "
                f"({cause.verify_message or cause.reason})",
                hresult=HResult.WINHTTP_SECURE_FAILURE,
                advice="put the server's root CA in server.ca_bundle")
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or cause)
            client_side = any(k in reason for k in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE",
                                                    "UNKNOWN_CA", "CERTIFICATE_UNKNOWN"))
            return UnreachableError(
                f"TLS with {url} failed: {reason}", hresult=HResult.WINHTTP_SECURE_FAILURE,
                advice="the server refused the client certificate: check server.client_cert "
                       "and server.client_key" if client_side else
                "check the server certificate, server.ca_bundle and the client certificate")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "name or service" in text or "nodename" in text:
            return UnreachableError(f"cannot resolve the host of {url}: {exc}",
                                    hresult=HResult.WINHTTP_NAME_NOT_RESOLVED)
        return UnreachableError(f"cannot connect to {url}: {exc or 'connection refused'}",
                                hresult=HResult.WINHTTP_CANNOT_CONNECT,
                                advice="check that the MDM server is running and reachable")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ConfigError(f"{url} is not a usable server URL: {exc}",
                           hresult=HResult.E_INVALIDARG)
    if isinstance(exc, httpx.RemoteProtocolError):
        return UnreachableError(f"{url} broke the HTTP protocol: {exc}",
                                hresult=HResult.WINHTTP_INVALID_SERVER_RESPONSE)
    return UnreachableError(f"the connection to {url} failed: {exc or type(exc).__name__}",
                            hresult=HResult.WINHTTP_CONNECTION_ERROR)
