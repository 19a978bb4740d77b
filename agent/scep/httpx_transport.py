"""The httpx side of the SCEP HTTP shell: the client the daemon, fleets and certinst share.

Kept apart from `agent.scep.client` so that one-shot commands, which use
`agent.httpio.BlockingHttp`, never import httpx.
"""

from __future__ import annotations

import ssl

from agent.config import ScepConfig
from agent.httpio import httpx


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


def make_http_client(cfg: ScepConfig, *,
                     verify: bool | str | ssl.SSLContext = True) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=5)
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout), follow_redirects=True,
                             headers={"User-Agent": cfg.user_agent},
                             transport=_LazyTlsTransport(verify, limits))
