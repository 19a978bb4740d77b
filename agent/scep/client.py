"""The SCEP HTTP shell (RFC 8894 §4): GetCACaps, GetCACert, PKIOperation over httpx.

The only httpx importer besides `agent.transport`. Everything protocol-shaped is in the sans-IO
modules; this file turns HTTP into bytes and transport failures into the HRESULTs WinHTTP
reports (`UnreachableError`), and refuses oversized or truncated bodies (`PeerError`).

URL form. Windows appends `/pkiclient.exe` to whatever ServerURL it is given and sends
`message=default` with GetCACaps/GetCACert (IIS logs in seed 001: `GET /certsrv/mscep/
mscep.dll/pkiclient.exe operation=GetCACaps&message=default`, and with a trailing slash the
respondent server shows `mscep.dll//pkiclient.exe`). NDES answers there; micromdm serves only
the bare endpoint (`/scep/pkiclient.exe` is a 404). So with `scep.windows_url_form` (default)
each server URL is tried first the Windows way and, on a 404, as given; a URL already ending in
`pkiclient.exe` is used as is. The form that answered GetCACaps is kept for the transaction.

Fallbacks. ServerURL may hold several `;`-separated URLs; as Windows does, the next one is
tried when a server cannot be reached, answers 5xx or 404. The URL that answered is the
"respondent server" of event 309.
"""

from __future__ import annotations

import base64
import logging
import ssl
import urllib.parse
from dataclasses import dataclass
from types import TracebackType

from agent.config import ScepConfig
from agent.diagnostics import HResult
from agent.errors import DmAgentError, PeerError, UnreachableError
from agent.httpio import (
    Peer,
    http_status_error,
    httpx,
    read_capped,
    read_snippet,
    transport_error,
)
from agent.scep.cacerts import CaCertificates, parse_ca_certs
from agent.scep.capabilities import Capabilities, parse_caps

log = logging.getLogger("dmagent.scep")

CT_PKI_MESSAGE = "application/x-pki-message"


@dataclass(frozen=True)
class Endpoint:
    """One place to send SCEP operations: `url` is what requests go to."""

    server_url: str  # the ServerURL entry it came from
    url: str
    windows_form: bool


def split_server_urls(server_url: str) -> list[str]:
    urls = [u.strip() for u in server_url.split(";") if u.strip()]
    if not urls:
        raise PeerError("Install/ServerURL is empty", hresult=HResult.E_INVALIDARG,
                        advice="the SCEP profile must name at least one SCEP server URL")
    for u in urls:
        parts = urllib.parse.urlsplit(u)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise PeerError(f"Install/ServerURL value {u!r} is not an http(s) URL",
                            hresult=HResult.E_INVALIDARG,
                            advice="fix ServerURL in the SCEP profile on the MDM server")
    return urls


def endpoints_for(server_url: str, windows_url_form: bool) -> list[list[Endpoint]]:
    """Per server URL, the endpoints to try in order (the second only after a 404)."""
    out: list[list[Endpoint]] = []
    for u in split_server_urls(server_url):
        path = urllib.parse.urlsplit(u).path
        if not windows_url_form:
            out.append([Endpoint(u, u, False)])
        elif path.lower().endswith("pkiclient.exe"):
            out.append([Endpoint(u, u, True)])
        else:
            base, _, query = u.partition("?")
            windows = base + "/pkiclient.exe" + (f"?{query}" if query else "")
            out.append([Endpoint(u, windows, True), Endpoint(u, u, False)])
    return out


class EndpointMemo:
    """Which URL form answered, per ServerURL entry.

    Held by whoever runs many enrollments against the same servers (a fleet, the daemon) and
    passed to each `ScepClient`, so only the first transaction pays the Windows-form probe
    (`.../pkiclient.exe` -> 404 -> bare URL) for a server that serves only the bare URL. The
    remembered form is tried first, never exclusively: if it stops answering, the others are
    tried again as usual.
    """

    def __init__(self) -> None:
        self._known: dict[str, Endpoint] = {}

    def get(self, server_url: str) -> Endpoint | None:
        return self._known.get(server_url)

    def remember(self, endpoint: Endpoint) -> None:
        self._known[endpoint.server_url] = endpoint


class _LazyTlsTransport(httpx.AsyncBaseTransport):
    """Plain-HTTP requests use a transport without CA bundle; the TLS one is built on demand.

    Loading the CA bundle into an SSLContext costs ~45 ms, which httpx pays when a client is
    created even if every ServerURL is http:// (the usual NDES and micromdm set-up on an
    internal network). TLS verification is unchanged for https: that transport is created,
    with `verify`, the first time an https URL (or a redirect to one) is requested.
    """

    def __init__(self, verify: bool | str | ssl.SSLContext, limits: httpx.Limits) -> None:
        self._verify = verify
        self._limits = limits
        # verify=False: this transport only ever carries http:// requests (no TLS at all).
        self._plain = httpx.AsyncHTTPTransport(verify=False, limits=limits)
        self._tls: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "http":
            return await self._plain.handle_async_request(request)
        if self._tls is None:
            self._tls = httpx.AsyncHTTPTransport(verify=self._verify, limits=self._limits)
        return await self._tls.handle_async_request(request)

    async def aclose(self) -> None:
        await self._plain.aclose()
        if self._tls is not None:
            await self._tls.aclose()


def make_http_client(config: ScepConfig | None = None, *,
                     verify: bool | str | ssl.SSLContext = True) -> httpx.AsyncClient:
    """The HTTP client SCEP uses: Windows' User-Agent, scep.timeout, redirects followed
    (WinHTTP follows them), environment proxies honoured, TLS set up only when needed."""
    cfg = config or ScepConfig()
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=5)
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout), follow_redirects=True,
                             headers={"User-Agent": cfg.user_agent},
                             transport=_LazyTlsTransport(verify, limits))


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


class ScepClient:
    """An async SCEP client for one ServerURL value (one transaction at a time)."""

    def __init__(self, server_url: str, config: ScepConfig | None = None, *,
                 http: httpx.AsyncClient | None = None, verify: bool | str | ssl.SSLContext = True,
                 memo: EndpointMemo | None = None) -> None:
        self.config = config or ScepConfig()
        self._memo = memo
        self._candidates = endpoints_for(server_url, self.config.windows_url_form)
        if memo is not None:
            for forms in self._candidates:
                known = memo.get(forms[0].server_url)
                if known in forms:
                    forms.sort(key=lambda e: e != known)
        self._own_http = http is None
        self._http = http or make_http_client(self.config, verify=verify)
        self.endpoint: Endpoint | None = None
        self.attempts: list[tuple[str, str]] = []  # (url, outcome) in order, for diagnostics

    async def __aenter__(self) -> ScepClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    @property
    def respondent_url(self) -> str:
        return self.endpoint.url if self.endpoint else ""

    # --- operations -------------------------------------------------------------------------

    async def get_ca_caps(self) -> Capabilities:
        """GetCACaps (§3.5.1); the first call chooses the endpoint (fallbacks, URL form)."""
        body, _ = await self._get_operation("GetCACaps")
        return parse_caps(body)

    async def get_ca_cert(self) -> CaCertificates:
        """GetCACert (§4.2): the CA certificate or the CA/RA chain, roles assigned."""
        body, ctype = await self._get_operation("GetCACert")
        return parse_ca_certs(body, ctype)

    async def pki_operation(self, message: bytes, *, post: bool) -> bytes:
        """PKIOperation (§4.3): POST the DER body, or GET it base64 + URL-encoded."""
        if self.endpoint is None:
            await self._select()  # GetCACaps picks the endpoint, as a real client starts
        endpoint = self.endpoint
        assert endpoint is not None
        if post:
            url = _with_query(endpoint.url, "operation=PKIOperation")
            body, _ = await self._fetch("POST", url, content=message,
                                        headers={"Content-Type": CT_PKI_MESSAGE})
        else:
            encoded = urllib.parse.quote(base64.b64encode(message).decode(), safe="")
            url = _with_query(endpoint.url, f"operation=PKIOperation&message={encoded}")
            body, _ = await self._fetch("GET", url)
        return body

    # --- endpoint selection -----------------------------------------------------------------

    def _operation_url(self, endpoint: Endpoint, operation: str) -> str:
        query = f"operation={operation}"
        if endpoint.windows_form:
            query += "&message=default"
        return _with_query(endpoint.url, query)

    async def _get_operation(self, operation: str) -> tuple[bytes, str]:
        if self.endpoint is not None:
            return await self._fetch("GET", self._operation_url(self.endpoint, operation))
        return await self._select(operation)

    async def _select(self, operation: str = "GetCACaps") -> tuple[bytes, str]:
        last: DmAgentError | None = None
        for forms in self._candidates:
            for index, endpoint in enumerate(forms):
                url = self._operation_url(endpoint, operation)
                try:
                    result = await self._fetch("GET", url)
                except UnreachableError as exc:
                    self.attempts.append((endpoint.url, exc.message))
                    last = exc
                    not_found = exc.hresult == HResult.HTTP_E_STATUS_NOT_FOUND
                    if not_found and index + 1 < len(forms):
                        log.debug("SCEP %s: 404 at %s, trying %s", operation, endpoint.url,
                                  forms[index + 1].url)
                        continue  # the other URL form on the same server
                    if _falls_back(exc):
                        break  # the next ServerURL
                    raise
                self.attempts.append((endpoint.url, "ok"))
                self.endpoint = endpoint
                if self._memo is not None:
                    self._memo.remember(endpoint)
                return result
        assert last is not None
        if len(self._candidates) > 1:
            tried = "; ".join(f"{u}: {why}" for u, why in self.attempts)
            raise type(last)(f"no SCEP server answered ({tried})", hresult=last.hresult,
                             advice=last.advice)
        raise last

    # --- HTTP -------------------------------------------------------------------------------

    async def _fetch(self, method: str, url: str, *, content: bytes | None = None,
                     headers: dict[str, str] | None = None) -> tuple[bytes, str]:
        """One request; the body is streamed and capped at scep.max_response_bytes."""
        limit = self.config.max_response_bytes
        shown = url.split("&message=", 1)[0]  # never log a PKIOperation message
        try:
            async with self._http.stream(method, url, content=content,
                                         headers=headers) as resp:
                status = resp.status_code
                if not 200 <= status < 300:
                    raise http_status_error(status, shown, await read_snippet(resp),
                                            SCEP_SERVER)
                buf = await read_capped(resp, shown, limit, SCEP_SERVER)
                log.debug("SCEP %s %s -> %d, %d bytes", method, shown, status, len(buf))
                return bytes(buf), resp.headers.get("content-type", "")
        except httpx.HTTPError as exc:
            raise transport_error(exc, shown, SCEP_SERVER) from None


def _falls_back(exc: UnreachableError) -> bool:
    """Transport failures, 404 and 5xx move on to the next ServerURL (as Windows does)."""
    hr = exc.hresult
    if (hr >> 16) == 0x8019:
        status = hr & 0xFFFF
        return status == 404 or status >= 500
    return True


SCEP_SERVER = Peer(
    name="the SCEP server", limit_setting="scep.max_response_bytes",
    timeout_setting="scep.timeout",
    too_large_advice="a SCEP reply is a few kilobytes; check the server URL",
    bad_url_is_config=False,  # ServerURL comes from the MDM server's profile
    http_advice={
        403: "NDES answers 403 on its bare URL; check that ServerURL names the SCEP endpoint",
        404: "check ServerURL (Windows appends /pkiclient.exe; scep.windows_url_form "
             "controls it)",
        500: "the SCEP server failed; its log says why",
    })
