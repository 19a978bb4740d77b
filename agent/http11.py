"""HTTP/1.1 on the client side, sans-IO (RFC 9112): a request to bytes, response bytes to events.

For the blocking transport of one-shot commands (`agent.httpio.BlockingHttp`). The standard
library's http.client would do, but importing it (with the `email` package it parses headers
with) and `ssl` (which it imports even for plain http) costs ~15 ms of a `dmagent scep enroll`
start, as much as the enrollment's whole conversation with the CA. SCEP needs little of HTTP:
one request at a time, GET and POST, bodies framed by Content-Length, chunks or the end of the
connection. This module is that, strictly: what it does not understand is a `ProtocolError`,
never a guess. No sockets, clock or logging here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

MAX_HEAD_BYTES: Final = 64 * 1024  # status line + headers (http.client: 64 KiB lines)
MAX_HEADERS: Final = 100  # http.client's limit too
MAX_CHUNK_LINE: Final = 1024  # "size;extensions" of one chunk
MAX_TRAILER_BYTES: Final = MAX_HEAD_BYTES  # all trailer fields of a chunked body
MAX_INTERIM: Final = 16  # 1xx responses before the final one (a server could send them forever)
_TOKEN: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                          b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


class ProtocolError(ValueError):
    """The peer broke HTTP/1.1 (the message says how); the connection cannot be used again."""


class InvalidTarget(ValueError):
    """A request target (the URL's path and query) that cannot be sent as it is."""


class ClosedBeforeResponse(ProtocolError):
    """The connection ended before the first byte of a response. On a kept-alive connection
    this is the server having closed it while idle: the request may be sent again."""


class IncompleteBody(ProtocolError):
    """The connection ended inside the body."""

    def __init__(self, received: int, expected: int | None) -> None:
        self.received = received
        self.expected = expected  # the Content-Length, None when chunked
        super().__init__(f"the connection ended after {received} bytes of the body" + (
            f" of {expected}" if expected is not None else " (chunked, no last chunk)"))


@dataclass(frozen=True)
class ResponseHead:
    """A final (non-1xx) response's status line and header fields, names in lower case."""

    status: int
    reason: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        """The field's value (several fields of one name joined with ", ", RFC 9110 §5.3)."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None


class Event(enum.Enum):
    NEED_DATA = "need data"  # feed more bytes (or b"" if the peer closed)
    END = "end of message"


class _State(enum.Enum):
    HEAD = 1
    LENGTH = 2  # Content-Length bytes
    CHUNK_SIZE = 3
    CHUNK_DATA = 4
    CHUNK_CRLF = 5
    TRAILERS = 6
    UNTIL_CLOSE = 7  # no framing: the body ends with the connection
    DONE = 8


def encode_request(method: str, target: str, host: str, headers: Mapping[str, str],
                   body: bytes | None) -> bytes:
    """The request's bytes. `host` is the Host field (host[:port], IPv6 in brackets).

    Control characters, spaces in the target and CR/LF in fields are refused (ValueError):
    a URL or header value from a profile must not be able to inject a second request.
    """
    if not method or not method.isalpha() or not method.isupper():
        raise ValueError(f"invalid HTTP method {method!r}")
    if not target or any(c <= " " or c == "\x7f" for c in target):
        raise InvalidTarget(f"the request target {target!r} has spaces or control characters")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        if not name or not set(name.encode("latin-1", "replace")) <= _TOKEN:
            raise ValueError(f"invalid header name {name!r}")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"the {name} header value has line breaks")
        if name.lower() not in ("host", "content-length", "transfer-encoding"):
            lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


class ResponseReader:
    """Reads one response to a request made with `method`.

    `receive(data)` what the socket gave (b"" once it is closed), then call `next_event()`
    until it says NEED_DATA: first a `ResponseHead` (1xx interim responses are skipped), then
    body bytes, then END. `keep_alive` says, after END, whether the connection can carry the
    next request. Errors raise ProtocolError (the reader is then unusable).
    """

    def __init__(self, method: str) -> None:
        self._head_only = method == "HEAD"
        self._buf = bytearray()
        self._scanned = 0  # leading bytes of _buf already searched for a line end in vain
        self._closed = False
        self._state = _State.HEAD
        self._remaining = 0
        self._received = 0  # body bytes so far
        self._expected: int | None = None
        self._persistent = False
        self._seen_bytes = False
        self._interim = 0
        self._trailer_bytes = 0
        self.head: ResponseHead | None = None

    @property
    def keep_alive(self) -> bool:
        """After END: the connection may be used again (nothing left over, not closing)."""
        return self._state is _State.DONE and self._persistent and not self._buf \
            and not self._closed

    def receive(self, data: bytes) -> None:
        if self._closed:
            raise RuntimeError("receive() after the end of the connection")
        if data:
            self._buf += data
            self._seen_bytes = True
        else:
            self._closed = True

    def next_event(self) -> ResponseHead | bytes | Event:
        while True:
            state = self._state
            if state is _State.HEAD:
                head = self._read_head()
                if head is None:
                    return Event.NEED_DATA
                if head.status == 101:
                    raise ProtocolError("the server switched protocols (101) unasked")
                if 100 <= head.status < 200:  # an interim response (100 Continue, 103 ...)
                    self._interim += 1
                    if self._interim > MAX_INTERIM:
                        raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")
                    continue
                self.head = head
                self._frame(head)
                return head
            if state is _State.DONE:
                return Event.END
            if state is _State.LENGTH or state is _State.CHUNK_DATA:
                if self._remaining == 0:
                    self._state = _State.DONE if state is _State.LENGTH else _State.CHUNK_CRLF
                    continue
                if not self._buf:
                    return self._need_body()
                data = bytes(self._buf[:self._remaining])
                del self._buf[:len(data)]
                self._scanned = 0
                self._remaining -= len(data)
                self._received += len(data)
                return data
            if state is _State.UNTIL_CLOSE:
                if self._buf:
                    data = bytes(self._buf)
                    self._buf.clear()
                    self._scanned = 0
                    self._received += len(data)
                    return data
                if self._closed:
                    self._state = _State.DONE
                    continue
                return Event.NEED_DATA
            line = self._line(MAX_CHUNK_LINE if state is _State.CHUNK_SIZE else MAX_HEAD_BYTES)
            if line is None:
                return self._need_body()
            if state is _State.CHUNK_SIZE:
                self._remaining = _chunk_size(line)
                self._state = _State.CHUNK_DATA if self._remaining else _State.TRAILERS
            elif state is _State.CHUNK_CRLF:
                if line:
                    raise ProtocolError("a chunk is longer than its size says")
                self._state = _State.CHUNK_SIZE
            elif not line:  # TRAILERS: the empty line ends the message
                self._state = _State.DONE
            elif b":" not in line:
                raise ProtocolError(f"a trailer field without a colon: {_shown(line)}")
            else:
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    raise ProtocolError(f"trailer fields larger than {MAX_TRAILER_BYTES} bytes")

    def _need_body(self) -> Event:
        if self._closed:
            raise IncompleteBody(self._received, self._expected)
        return Event.NEED_DATA

    def _line(self, limit: int) -> bytes | None:
        """The next line without its CRLF (a bare LF is accepted, RFC 9112 §2.2)."""
        end = self._buf.find(b"\n", self._scanned)  # (bytes arriving one by one stay linear)
        if end < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > limit:
                raise ProtocolError(f"a line longer than {limit} bytes")
            return None
        if end > limit:
            raise ProtocolError(f"a line longer than {limit} bytes")
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        self._scanned = 0
        return line[:-1] if line.endswith(b"\r") else line

    def _read_head(self) -> ResponseHead | None:
        start = max(0, self._scanned - 3)  # a terminator may have begun in the scanned part
        end = self._buf.find(b"\r\n\r\n", start)
        size = end + 4
        lf = self._buf.find(b"\n\n", start)
        if lf >= 0 and (end < 0 or lf < end):
            end, size = lf, lf + 2
        if end < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ProtocolError(f"the response head is larger than {MAX_HEAD_BYTES} bytes")
            if self._closed:
                if not self._seen_bytes:
                    raise ClosedBeforeResponse("the connection ended before any response")
                raise ProtocolError(f"the connection ended inside the response head "
                                    f"({_shown(bytes(self._buf))})")
            if not b"HTTP/".startswith(bytes(self._buf[:5])):  # fail fast on a banner
                raise ProtocolError(f"the reply is not HTTP: {_shown(bytes(self._buf))}")
            return None
        if end > MAX_HEAD_BYTES:
            raise ProtocolError(f"the response head is larger than {MAX_HEAD_BYTES} bytes")
        raw = bytes(self._buf[:end])
        del self._buf[:size]
        self._scanned = 0
        return _parse_head(raw)

    def _frame(self, head: ResponseHead) -> None:
        """How the body ends (RFC 9112 §6.3) and whether the connection persists (§9.3)."""
        connection = {t.strip().lower() for t in (head.get("connection") or "").split(",")}
        self._persistent = head.version == "HTTP/1.1" and "close" not in connection
        if self._head_only or head.status in (204, 304):
            self._state = _State.DONE
            return
        coding = head.get("transfer-encoding")
        lengths = [v for k, v in head.headers if k == "content-length"]
        if coding is not None:
            self._persistent = self._persistent and not lengths  # §6.3 item 3: smuggling risk
            final = coding.split(",")[-1].strip().lower()
            if final == "chunked":
                self._state = _State.CHUNK_SIZE
            else:
                self._state, self._persistent = _State.UNTIL_CLOSE, False
            return
        if lengths:
            values = {v.strip() for value in lengths for v in value.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit() or \
                    not next(iter(values)).isascii():
                raise ProtocolError(f"invalid Content-Length {', '.join(lengths)!r}")
            self._remaining = self._expected = int(next(iter(values)))
            self._state = _State.LENGTH
            return
        self._state, self._persistent = _State.UNTIL_CLOSE, False


def _parse_head(raw: bytes) -> ResponseHead:
    lines = raw.split(b"\n")
    status_line = lines[0].rstrip(b"\r")
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError(f"the reply is not HTTP/1.x: {_shown(status_line)}")
    if len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"invalid status line: {_shown(status_line)}")
    if len(lines) - 1 > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} header fields")
    headers = []
    for raw_line in lines[1:]:
        line = raw_line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError("a folded header line (obsolete, RFC 9112 §5.2)")
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TOKEN:
            raise ProtocolError(f"invalid header field: {_shown(line)}")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return ResponseHead(int(code), reason.decode("latin-1"), version.decode("ascii"),
                        tuple(headers))


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 16 or not set(size) <= _HEX:
        raise ProtocolError(f"invalid chunk size line: {_shown(line)}")
    return int(size, 16)


def _shown(data: bytes) -> str:
    """A bounded, printable rendering of peer bytes for a message."""
    text = data[:80].decode("latin-1")
    return repr(text + ("..." if len(data) > 80 else ""))
