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

The HTTP plumbing shared with the SCEP client (capped reads, WinHTTP HRESULTs) is in
`agent.httpio`, the only module that imports httpx. One `HttpTransport` belongs to one device
(its client certificate): fleets create one per device.
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from agent.config import ServerConfig
from agent.diagnostics import HResult
from agent.errors import ConfigError, PeerError
from agent.httpio import (
    Peer,
    http_status_error,
    httpx,
    read_capped,
    read_snippet,
    transport_error,
)
from agent.syncml.messages import CONTENT_TYPE

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
                    raise http_status_error(status, url, await read_snippet(resp), MDM_SERVER,
                                            resp.headers)
                buf = await read_capped(resp, url, limit, MDM_SERVER)
                log.debug("POST %s: %d bytes -> HTTP %d, %d bytes", url, len(body), status,
                          len(buf))
                if buf.strip():
                    _check_content_type(resp.headers.get("content-type", ""), url, bytes(buf))
                return bytes(buf)
        except httpx.HTTPError as exc:
            raise transport_error(exc, url, MDM_SERVER) from None
        except OSError as exc:
            # httpcore lets some TLS failures through unwrapped, e.g. TLS 1.3's "certificate
            # required" alert, which arrives with the first read after the handshake.
            raise transport_error(exc, url, MDM_SERVER) from None


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


MDM_SERVER = Peer(
    name="the MDM server", limit_setting="server.max_response_bytes",
    timeout_setting="server.timeout",
    too_large_advice="the client advertises its MaxMsgSize; the server must respect it",
    http_advice={
        401: "the server did not accept the device (is the MDM client certificate "
             "configured: server.client_cert?)",
        403: "the server refused the device; check its enrollment on the server",
        404: "check the enrollment's server URL (ADDR)",
        429: "the server is throttling the device; sync again later",
    })
