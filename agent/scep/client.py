"""The SCEP HTTP shell (RFC 8894 §4): GetCACaps, GetCACert, PKIOperation.

Everything protocol-shaped is in the sans-IO modules; this file turns HTTP into bytes and
transport failures into the HRESULTs WinHTTP reports (`UnreachableError`), and refuses
oversized or truncated bodies (`PeerError`). Requests go through an httpx.AsyncClient
(`make_http_client`: the daemon, fleets, certinst) or, for one-shot commands, through
`agent.httpio.BlockingHttp` (`make_blocking_http`), whose coroutines never suspend, so the
whole flow runs without an event loop (`agent.scep.enroll.run_inline`); httpx is imported
only for the former. Both report failures alike (`agent.httpio`).

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
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from agent.config import ScepConfig
from agent.diagnostics import HResult
from agent.errors import DmAgentError, PeerError, UnreachableError
from agent.httpio import (
    BlockingHttp,
    Peer,
    http_status_error,
    read_capped,
    read_snippet,
    transport_error,
)
from agent.logsetup import debug
from agent.scep.capabilities import Capabilities, parse_caps

if TYPE_CHECKING:
    import ssl

    import httpx

    from agent.scep.cacerts import CaCertificates

LOGGER = "dmagent.scep"  # debug lines only (agent.logsetup.debug: no logging import)

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


def make_http_client(config: ScepConfig | None = None, *,
                     verify: bool | str | ssl.SSLContext = True) -> httpx.AsyncClient:
    """The httpx client SCEP uses: Windows' User-Agent, scep.timeout, redirects followed
    (WinHTTP follows them), TLS set up only when needed. No proxy: httpx applies the
    environment's proxy variables only to clients without a custom transport (and WinHTTP's
    default is direct access unless a proxy is configured for it)."""
    from agent.scep.httpx_transport import make_http_client as make

    return make(config or ScepConfig(), verify=verify)


def make_blocking_http(config: ScepConfig | None = None, *,
                       verify: bool | str | ssl.SSLContext = True) -> BlockingHttp:
    """The same for one-shot commands, without an event loop."""
    cfg = config or ScepConfig()
    return BlockingHttp(timeout=cfg.timeout, headers={"User-Agent": cfg.user_agent},
                        verify=verify)


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


class ScepClient:
    """An async SCEP client for one ServerURL value (one transaction at a time)."""

    def __init__(self, server_url: str, config: ScepConfig | None = None, *,
                 http: httpx.AsyncClient | BlockingHttp | None = None,
                 verify: bool | str | ssl.SSLContext = True,
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
        self._http: httpx.AsyncClient | BlockingHttp = (
            http if http is not None else make_http_client(self.config, verify=verify))
        self.endpoint: Endpoint | None = None
        self.attempts: list[tuple[str, str]] = []  # (url, outcome) in order, for diagnostics

    async def __aenter__(self) -> ScepClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if not self._own_http:
            return
        if isinstance(self._http, BlockingHttp):
            self._http.close()
        else:
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
        from agent.scep.cacerts import parse_ca_certs

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
                        debug(LOGGER, "SCEP %s: 404 at %s, trying %s", operation,
                              endpoint.url, forms[index + 1].url)
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
        if isinstance(self._http, BlockingHttp):
            body, ctype = self._http.fetch(method, url, limit=limit, peer=SCEP_SERVER,
                                           content=content, headers=headers, shown=shown)
            debug(LOGGER, "SCEP %s %s -> %d bytes", method, shown, len(body))
            return body, ctype
        from agent.httpio import httpx

        try:
            async with self._http.stream(method, url, content=content,
                                         headers=headers) as resp:
                status = resp.status_code
                if not 200 <= status < 300:
                    raise http_status_error(status, shown, await read_snippet(resp),
                                            SCEP_SERVER)
                buf = await read_capped(resp, shown, limit, SCEP_SERVER)
                debug(LOGGER, "SCEP %s %s -> %d, %d bytes", method, shown, status,
                      len(buf))
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
