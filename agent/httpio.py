"""What both HTTP shells (the OMA-DM transport and the SCEP client) share: a lean `httpx`
import, bodies read with a cap, and HTTP/transport failures turned into the HRESULTs WinHTTP
reports. Each shell says who its peer is and which setting caps it; the wording follows.
"""

from __future__ import annotations

import socket
import ssl
import sys
import types
from dataclasses import dataclass, field

from agent.diagnostics import HResult, hresult_from_http_status
from agent.errors import ConfigError, DmAgentError, PeerError, UnreachableError


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


_skip_httpx_cli()

import httpx  # noqa: E402 - after the stand-in above

__all__ = ["SNIPPET", "Peer", "http_status_error", "httpx", "read_capped", "read_snippet",
           "too_large", "transport_error"]

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
        raise PeerError(
            f"the response from {url} is truncated: the connection ended after {len(buf)} "
            f"bytes" + (f" of the {declared} announced" if declared else "") + f" ({exc})",
            hresult=HResult.WINHTTP_CONNECTION_ERROR,
            advice="the server or a proxy cut the response short") from None
    return bytes(buf)


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


def transport_error(exc: httpx.HTTPError | OSError, url: str, peer: Peer) -> DmAgentError:
    """WinHTTP's view of a transport failure (HRESULT_FROM_WIN32(ERROR_WINHTTP_*))."""
    if isinstance(exc, httpx.TimeoutException):  # before the causes: a TLS read can time out
        return UnreachableError(f"{url} did not answer in time ({type(exc).__name__})",
                                hresult=HResult.WINHTTP_TIMEOUT,
                                advice=f"raise {peer.timeout_setting} or check the server")
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return UnreachableError(f"cannot resolve the host of {url}: {cause.strerror}",
                                    hresult=HResult.WINHTTP_NAME_NOT_RESOLVED)
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = (getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
                   or str(cause))
            return UnreachableError(
                f"TLS with {url} failed: the server certificate is not trusted ({why})",
                hresult=HResult.WINHTTP_SECURE_FAILURE,
                advice="put the server's root CA in the trusted bundle (server.ca_bundle)")
        if isinstance(cause, ssl.SSLError):
            reason = str(getattr(cause, "reason", None) or cause)
            client_side = any(k in reason for k in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE",
                                                    "UNKNOWN_CA", "CERTIFICATE_UNKNOWN"))
            return UnreachableError(
                f"TLS with {url} failed: {reason}", hresult=HResult.WINHTTP_SECURE_FAILURE,
                advice="the server refused the client certificate: check server.client_cert "
                       "and server.client_key" if client_side else
                "check the server certificate, its trust and the client certificate")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "name or service" in text or "nodename" in text:
            return UnreachableError(f"cannot resolve the host of {url}: {exc}",
                                    hresult=HResult.WINHTTP_NAME_NOT_RESOLVED)
        return UnreachableError(f"cannot connect to {url}: {exc or 'connection refused'}",
                                hresult=HResult.WINHTTP_CANNOT_CONNECT,
                                advice=f"check that {peer.name} is running and reachable")
    if isinstance(exc, httpx.TooManyRedirects):
        return UnreachableError(f"{url} redirects too many times",
                                hresult=HResult.HTTP_E_STATUS_UNEXPECTED_REDIRECTION)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        kind = ConfigError if peer.bad_url_is_config else PeerError
        return kind(f"{url} is not a usable URL: {exc}", hresult=HResult.E_INVALIDARG)
    if isinstance(exc, httpx.RemoteProtocolError):
        return UnreachableError(f"{url} broke the HTTP protocol: {exc}",
                                hresult=HResult.WINHTTP_INVALID_SERVER_RESPONSE)
    return UnreachableError(f"the connection to {url} failed: {exc or type(exc).__name__}",
                            hresult=HResult.WINHTTP_CONNECTION_ERROR)
