"""agent.http11: HTTP/1.1 requests to bytes and response bytes to events, table-driven.

Every response vector is fed three ways (whole, byte by byte, in random pieces) and must read
the same; every malformed one must raise ProtocolError, never something else, never hang.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.http11 import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_INTERIM,
    ClosedBeforeResponse,
    Event,
    IncompleteBody,
    InvalidTarget,
    ProtocolError,
    ResponseHead,
    ResponseReader,
    encode_request,
)


def read_all(pieces: list[bytes], method: str = "GET",
             close: bool = True) -> tuple[ResponseHead, bytes, bool]:
    """Feed `pieces` (then EOF when `close`); the head, the body and keep_alive."""
    reader = ResponseReader(method)
    head: ResponseHead | None = None
    body = bytearray()
    queue = list(pieces)
    while True:
        event = reader.next_event()
        if event is Event.NEED_DATA:
            if queue:
                reader.receive(queue.pop(0))
            elif close:
                reader.receive(b"")
                close = False
            else:
                raise AssertionError("the reader wants more than the message")
        elif event is Event.END:
            assert head is not None
            return head, bytes(body), reader.keep_alive
        elif isinstance(event, ResponseHead):
            assert head is None, "two heads"
            head = event
        else:
            assert isinstance(event, bytes) and event
            body += event


def ways(raw: bytes) -> list[list[bytes]]:
    return [[raw], [raw[i:i + 1] for i in range(len(raw))],
            [raw[:7], raw[7:23], raw[23:24], raw[24:]]]


# raw response, request method, close after it, expected (status, body, keep_alive)
GOOD: dict[str, tuple[bytes, str, bool, tuple[int, bytes, bool]]] = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET", False,
                       (200, b"hello", True)),
    "zero length": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", False,
                    (200, b"", True)),
    "chunked, extension, trailer": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n"
        b"A\r\n, world!!!\r\n0\r\nX-Trailer: 1\r\n\r\n", "GET", False,
        (200, b"hello, world!!!", True)),
    "chunked wins over content-length, not reused": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n", "GET", False, (200, b"ok", False)),
    "until close": (b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nall of it", "GET", True,
                    (200, b"all of it", False)),
    "other coding: until close": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz",
                                  "GET", True, (200, b"zz", False)),
    "connection close": (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n"
                         b"Content-Length: 2\r\n\r\nok", "GET", False, (200, b"ok", False)),
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False,
                 (200, b"ok", False)),
    "interim responses skipped": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                                  b"Link: </a>\r\n\r\nHTTP/1.1 201 Created\r\n"
                                  b"Content-Length: 1\r\n\r\nx", "POST", False,
                                  (201, b"x", True)),
    "204 has no body": (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", False, (204, b"", True)),
    "304 has no body": (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET",
                        False, (304, b"", True)),
    "HEAD has no body": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD", False,
                         (200, b"", True)),
    "bare LF": (b"HTTP/1.1 404 Not Found\nContent-Length: 3\n\nnot", "GET", False,
                (404, b"not", True)),
    "equal content-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2"
                              b"\r\n\r\nok", "GET", False, (200, b"ok", True)),
    "no reason phrase": (b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n1", "GET", False,
                         (200, b"1", True)),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_well_formed_responses(case: str) -> None:
    raw, method, close, expected = GOOD[case]
    for pieces in ways(raw):
        head, body, keep_alive = read_all(pieces, method, close)
        assert (head.status, body, keep_alive) == expected, pieces


def test_bytes_after_the_message_make_the_connection_unusable() -> None:
    # (when they arrive later, the transport sees the idle socket readable and drops it)
    assert read_all([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1junk"],
                    close=False)[1:] == (b"1", False)


def test_head_fields() -> None:
    head, _, _ = read_all([b"HTTP/1.1 302 Found\r\nLocation: /x\r\nX-A: 1\r\nx-a:  2 \r\n"
                           b"Content-Length: 0\r\n\r\n"], close=False)
    assert (head.status, head.reason, head.version) == (302, "Found", "HTTP/1.1")
    assert head.get("location") == "/x"
    assert head.get("x-a") == "1, 2"  # names case-insensitive, values trimmed, joined
    assert head.get("retry-after") is None


BAD: dict[str, tuple[bytes, type[ProtocolError], str]] = {
    "a banner": (b"SSH-2.0-OpenSSH_9.6\r\n", ProtocolError, "not HTTP"),
    "HTTP/2": (b"HTTP/2 200 OK\r\n\r\n", ProtocolError, "not HTTP/1.x"),
    "status of four digits": (b"HTTP/1.1 2000 OK\r\n\r\n", ProtocolError, "status line"),
    "status not digits": (b"HTTP/1.1 2x0 OK\r\n\r\n", ProtocolError, "status line"),
    "field without colon": (b"HTTP/1.1 200 OK\r\nContent-Length 2\r\n\r\nok", ProtocolError,
                            "invalid header field"),
    "space in a field name": (b"HTTP/1.1 200 OK\r\nContent Length: 2\r\n\r\nok",
                              ProtocolError, "invalid header field"),
    "folded field": (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n",
                     ProtocolError, "folded"),
    "content-length not a number": (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
                                    ProtocolError, "Content-Length"),
    "content-lengths differ": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3"
                               b"\r\n\r\nok", ProtocolError, "Content-Length"),
    "negative content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                                ProtocolError, "Content-Length"),
    "non-ASCII digits": ("HTTP/1.1 200 OK\r\nContent-Length: \u0663\r\n\r\n".encode(),
                         ProtocolError, "Content-Length"),
    "chunk size not hex": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                           ProtocolError, "chunk size"),
    "chunk size too long": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"1" + b"0" * 16 + b"\r\n", ProtocolError, "chunk size"),
    "chunk longer than its size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"2\r\nokay\r\n0\r\n\r\n", ProtocolError, "longer"),
    "switching protocols": (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", ProtocolError, "101"),
    "head too large": (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
                       ProtocolError, "larger than"),
    "too many fields": (b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n",
                        ProtocolError, "header fields"),
    "endless interim responses": (b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM + 1),
                                  ProtocolError, "interim"),
    "endless trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" +
                         (b"X-T: " + b"t" * 1000 + b"\r\n") * 70, ProtocolError,
                         "trailer fields"),
    "trailer without colon": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
                              b"garbage\r\n\r\n", ProtocolError, "without a colon"),
    "closed before any byte": (b"", ClosedBeforeResponse, "before any response"),
    "closed inside the head": (b"HTTP/1.1 200 OK\r\nContent-Le", ProtocolError,
                               "inside the response head"),
    "closed inside a sized body": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd",
                                   IncompleteBody, "after 4 bytes of the body of 10"),
    "closed inside a chunked body": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"5\r\nhel", IncompleteBody, "after 3 bytes"),
    "closed before the last chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"2\r\nok\r\n", IncompleteBody, "no last chunk"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_responses_are_protocol_errors(case: str) -> None:
    raw, error, text = BAD[case]
    for pieces in ways(raw) if raw else [[]]:
        with pytest.raises(error, match=text):
            read_all(pieces)


def test_incomplete_body_counts() -> None:
    with pytest.raises(IncompleteBody) as caught:
        read_all([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd"])
    assert (caught.value.received, caught.value.expected) == (4, 10)


def test_a_banner_fails_before_the_head_ends() -> None:
    reader = ResponseReader("GET")
    reader.receive(b"220 smtp.example ESMTP")  # no blank line ever comes
    with pytest.raises(ProtocolError, match="not HTTP"):
        reader.next_event()


def test_receive_after_eof_is_a_bug() -> None:
    reader = ResponseReader("GET")
    reader.receive(b"")
    with pytest.raises(RuntimeError):
        reader.receive(b"x")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=12))
def test_arbitrary_bytes_end_or_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    pieces, rest = [], data
    for n in cuts:
        pieces.append(rest[:n])
        rest = rest[n:]
    pieces = [p for p in [*pieces, rest] if p]
    # read_all fails on any other exception, and on a reader still asking for data after EOF
    with contextlib.suppress(ProtocolError):
        read_all(pieces)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), min_size=1, max_size=10),
       st.sampled_from(["length", "chunked"]))
def test_any_body_round_trips(body: bytes, sizes: list[int], framing: str) -> None:
    if framing == "length":
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    else:
        chunks, rest, i = [], body, 0
        while rest:
            n = sizes[i % len(sizes)]
            chunks.append(b"%x\r\n" % len(rest[:n]) + rest[:n] + b"\r\n")
            rest, i = rest[n:], i + 1
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(chunks) + \
            b"0\r\n\r\n"
    for pieces in ways(raw):
        head, got, keep_alive = read_all(pieces, close=False)
        assert (head.status, got, keep_alive) == (200, body, True)


# --- requests ---------------------------------------------------------------------------------

def test_get_request_bytes() -> None:
    raw = encode_request("GET", "/scep?operation=GetCACaps", "127.0.0.1:8080",
                         {"User-Agent": "ua", "Accept": "*/*"}, None)
    assert raw == (b"GET /scep?operation=GetCACaps HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                   b"User-Agent: ua\r\nAccept: */*\r\n\r\n")


def test_post_request_bytes() -> None:
    raw = encode_request("POST", "/scep?operation=PKIOperation", "ca.example",
                         {"Content-Type": "application/x-pki-message",
                          "Content-Length": "999", "Host": "evil"}, b"\x30\x80")
    assert raw == (b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: ca.example\r\n"
                   b"Content-Type: application/x-pki-message\r\nContent-Length: 2\r\n\r\n"
                   b"\x30\x80")
    assert encode_request("POST", "/", "h", {}, None).endswith(b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize("target", ["/a b", "/a\r\nX-Injected: 1", "/\x00", "", "/\x7f"])
def test_a_target_that_could_inject_is_refused(target: str) -> None:
    with pytest.raises(InvalidTarget):
        encode_request("GET", target, "h", {}, None)


@pytest.mark.parametrize(("method", "headers"), [
    ("GET", {"User-Agent": "a\r\nX-Injected: 1"}), ("GET", {"Bad Name": "x"}),
    ("GET", {"": "x"}), ("get", {}), ("G T", {}),
])
def test_bad_methods_and_fields_are_refused(method: str, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_request(method, "/", "h", headers, None)
