"""DM tree URIs: parse a LocURI into scope + node path, the way the Windows DM client reads them.

Rules (OMA-TS-DM_TND-V1_2 §6 "URI"; MS "OMA DM protocol support", user- vs device-targeted
configuration):
- `./Device/Vendor/MSFT/...` and `./Vendor/MSFT/...` are the device scope (no prefix means
  device-targeted), `./User/Vendor/MSFT/...` the enrolled user's scope; `./DevInfo`,
  `./DevDetail` are standard objects outside both. The scope word is matched without regard
  to case (MS examples write `./user/vendor/MSFT`).
- A relative URI (`Vendor/MSFT/...`) is relative to the root; a LocURI may not start with `/`.
- Surrounding whitespace is trimmed (servers send it); empty segments, `.`/`..` segments, a
  trailing `/` and a segment that is only `*` are malformed (400).
- Segments are `%`-escaped UTF-8 (RFC 3986 percent-encoding; `MDM%20SyncML%20Server` is the
  node `MDM SyncML Server`); a bad escape is 400.
- Longer than the limits DevDetail/URI advertises (MaxTotLen, MaxSegLen, MaxDepth): 414.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote_to_bytes

from agent.dmtree.errors import DMStatusError
from agent.syncml.messages import StatusCode

# The limits the device advertises in ./DevDetail/URI/{MaxDepth,MaxTotLen,MaxSegLen}; the
# parser enforces the same numbers so what we advertise is what we accept.
MAX_DEPTH: Final = 32
MAX_TOTAL_LEN: Final = 2048
MAX_SEGMENT_LEN: Final = 255

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class Scope(enum.StrEnum):
    DEVICE = "Device"
    USER = "User"
    GLOBAL = ""  # ./DevInfo, ./DevDetail and the root itself


@dataclass(frozen=True)
class NodeUri:
    """A parsed LocURI. `segments` are decoded node names after the scope prefix."""

    raw: str  # the trimmed LocURI as the server sent it (echoed in Results Source)
    scope: Scope
    segments: tuple[str, ...]

    @property
    def canonical(self) -> str:
        """`./Device/Vendor/MSFT/...`, `./User/...` or `./DevInfo/...`, segments escaped."""
        parts = ["."]
        if self.scope is not Scope.GLOBAL:
            parts.append(self.scope.value)
        parts += [encode_segment(s) for s in self.segments]
        return "/".join(parts)

    def __str__(self) -> str:
        return self.raw


def encode_segment(name: str) -> str:
    """Escape a node name for a URI (interior Get returns child names this way)."""
    return quote(name, safe="!$&'()*+,;=:@-._~")


def parse_uri(text: str | None) -> NodeUri:
    """Parse a Target/Source LocURI; raises DMStatusError 400 (malformed) or 414 (too long)."""
    if text is None or not text.strip():
        raise DMStatusError(StatusCode.BAD_REQUEST, "missing LocURI")
    raw = text.strip()
    if len(raw) > MAX_TOTAL_LEN:
        raise DMStatusError(StatusCode.URI_TOO_LONG,
                            f"URI longer than {MAX_TOTAL_LEN} characters")
    if raw.startswith("/"):
        raise DMStatusError(StatusCode.BAD_REQUEST, f"LocURI may not start with '/': {raw}")
    body = raw
    if body == ".":
        return NodeUri(raw, Scope.GLOBAL, ())
    if body.startswith("./"):
        body = body[2:]
    parts = body.split("/")
    if len(parts) > MAX_DEPTH + 1:  # +1: the scope word is not a tree level of its own
        raise DMStatusError(StatusCode.URI_TOO_LONG, f"URI deeper than {MAX_DEPTH} levels")
    segments = tuple(_decode(p, raw) for p in parts)
    scope = Scope.GLOBAL
    if segments and segments[0].lower() in ("device", "user"):
        scope = Scope.DEVICE if segments[0].lower() == "device" else Scope.USER
        segments = segments[1:]
        if not segments:
            return NodeUri(raw, scope, ())
    elif segments and segments[0].lower() == "vendor":
        scope = Scope.DEVICE  # no ./Device or ./User prefix: device-targeted
    if len(segments) > MAX_DEPTH:
        raise DMStatusError(StatusCode.URI_TOO_LONG, f"URI deeper than {MAX_DEPTH} levels")
    return NodeUri(raw, scope, segments)


def _decode(segment: str, raw: str) -> str:
    if segment == "":
        raise DMStatusError(StatusCode.BAD_REQUEST, f"empty node name in {raw}")
    if segment in (".", ".."):
        raise DMStatusError(StatusCode.BAD_REQUEST, f"relative segment {segment!r} in {raw}")
    if _BAD_ESCAPE.search(segment):
        raise DMStatusError(StatusCode.BAD_REQUEST, f"malformed %-escape in {raw}")
    try:
        name = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise DMStatusError(StatusCode.BAD_REQUEST,
                            f"%-escapes in {raw} are not UTF-8") from None
    if len(name) > MAX_SEGMENT_LEN:
        raise DMStatusError(StatusCode.URI_TOO_LONG,
                            f"node name longer than {MAX_SEGMENT_LEN} characters")
    if name == "*":
        raise DMStatusError(StatusCode.BAD_REQUEST, "a node name cannot be only '*'")
    if name == "" or "\\" in name or "\x00" in name or "/" in name:
        # A backslash or NUL cannot be stored as a registry key name; an escaped '/' would
        # make a node whose name is not a single URI segment.
        raise DMStatusError(StatusCode.BAD_REQUEST, f"invalid node name {name!r} in {raw}")
    return name
