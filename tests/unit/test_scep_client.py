"""agent.scep.client without a network: URL forms, fallback rules, error translation."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest

from agent.diagnostics import HResult
from agent.errors import PeerError, UnreachableError
from agent.httpio import http_status_error, transport_error
from agent.scep.client import SCEP_SERVER, EndpointMemo, ScepClient, _falls_back, endpoints_for


@pytest.mark.parametrize(("server_url", "windows", "expected"), [
    ("https://ndes.example/certsrv/mscep/mscep.dll", True,
     [["https://ndes.example/certsrv/mscep/mscep.dll/pkiclient.exe",
       "https://ndes.example/certsrv/mscep/mscep.dll"]]),
    # Windows appends to whatever it gets: a trailing slash gives '//pkiclient.exe' (seed 001)
    ("https://ndes.example/certsrv/mscep/mscep.dll/", True,
     [["https://ndes.example/certsrv/mscep/mscep.dll//pkiclient.exe",
       "https://ndes.example/certsrv/mscep/mscep.dll/"]]),
    ("http://ca.example/scep/pkiclient.exe", True, [["http://ca.example/scep/pkiclient.exe"]]),
    ("http://ca.example/scep?tenant=a", True,
     [["http://ca.example/scep/pkiclient.exe?tenant=a", "http://ca.example/scep?tenant=a"]]),
    ("http://ca.example/scep", False, [["http://ca.example/scep"]]),
    (" http://a.example/x ; ;http://b.example/y ", False,
     [["http://a.example/x"], ["http://b.example/y"]]),
])
def test_endpoints(server_url: str, windows: bool, expected: list[list[str]]) -> None:
    got = endpoints_for(server_url, windows)
    assert [[e.url for e in forms] for forms in got] == expected
    assert all(e.server_url == forms[0].server_url for forms in got for e in forms)


@pytest.mark.parametrize("bad", ["", " ; ", "ftp://x/scep", "not a url", "http:///nohost"])
def test_bad_server_url(bad: str) -> None:
    with pytest.raises(PeerError) as err:
        endpoints_for(bad, True)
    assert err.value.hresult == HResult.E_INVALIDARG
    assert "ServerURL" in err.value.message


def test_memo_puts_the_known_form_first() -> None:
    memo = EndpointMemo()
    bare = endpoints_for("http://ca.example/scep", True)[0][1]
    memo.remember(bare)
    client = ScepClient("http://ca.example/scep", memo=memo)
    assert [e.url for e in client._candidates[0]] == ["http://ca.example/scep",
                                                     "http://ca.example/scep/pkiclient.exe"]


@pytest.mark.parametrize(("hresult", "falls_back"), [
    (0x80190194, True), (0x801901F4, True), (0x801901F7, True), (0x80190193, False),
    (0x80190191, False), (HResult.WINHTTP_CANNOT_CONNECT, True), (HResult.WINHTTP_TIMEOUT, True),
])
def test_fallback_rule(hresult: int, falls_back: bool) -> None:
    assert _falls_back(UnreachableError("x", hresult=hresult)) is falls_back


def test_http_error_text() -> None:
    err = http_status_error(503, "http://x/scep?operation=GetCACaps",
                            b"Service Unavailable\nmore", SCEP_SERVER)
    assert err.hresult == 0x801901F7
    assert err.message == ("the SCEP server answered HTTP 503 for "
                           "http://x/scep?operation=GetCACaps: Service Unavailable")


def _caused(exc: httpx.HTTPError, cause: BaseException) -> httpx.HTTPError:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(("exc", "hresult", "etype"), [
    (_caused(httpx.ConnectError("x"), socket.gaierror(-2, "Name or service not known")),
     HResult.WINHTTP_NAME_NOT_RESOLVED, UnreachableError),
    (_caused(httpx.ConnectError("x"), ssl.SSLCertVerificationError("bad cert")),
     HResult.WINHTTP_SECURE_FAILURE, UnreachableError),
    (httpx.ConnectError("[Errno 111] Connection refused"), HResult.WINHTTP_CANNOT_CONNECT,
     UnreachableError),
    (httpx.ConnectTimeout("t"), HResult.WINHTTP_TIMEOUT, UnreachableError),
    (httpx.ReadTimeout("t"), HResult.WINHTTP_TIMEOUT, UnreachableError),
    (httpx.RemoteProtocolError("illegal header"), HResult.WINHTTP_INVALID_SERVER_RESPONSE,
     UnreachableError),
    (httpx.ReadError("reset"), HResult.WINHTTP_CONNECTION_ERROR, UnreachableError),
    (httpx.TooManyRedirects("loop"), HResult.HTTP_E_STATUS_UNEXPECTED_REDIRECTION,
     UnreachableError),
    (httpx.UnsupportedProtocol("gopher"), HResult.E_INVALIDARG, PeerError),
])
def test_transport_errors_are_winhttp_hresults(exc: httpx.HTTPError, hresult: int,
                                               etype: type) -> None:
    err = transport_error(exc, "http://x/scep", SCEP_SERVER)
    assert type(err) is etype
    assert err.hresult == hresult
    assert "http://x/scep" in err.message


def test_httpx_cli_is_not_imported() -> None:
    """client.py imports httpx only for an httpx client, and then without its CLI (rich costs
    ~50 ms of start-up)."""
    import subprocess
    import sys

    code = ("import sys, agent.scep.client as c; print('httpx' in sys.modules); "
            "c.make_http_client(); import httpx; "
            "print('rich' in sys.modules, callable(httpx.main))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False", "True"]
