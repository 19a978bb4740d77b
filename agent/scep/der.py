"""A few DER encoders (X.690) for the structures dmagent writes itself.

Messages are assembled from byte strings instead of asn1crypto objects: building an
asn1crypto tree and dumping it costs several milliseconds per SCEP request (most of the
client-side time of an enrollment), concatenating a few TLVs costs microseconds, and the
output is the same DER. Parsing stays with asn1crypto (`agent.scep.cms`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache


def length(n: int) -> bytes:
    """Definite length octets, minimal form (X.690 §8.1.3, §10.1)."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes([tag]) + length(len(body)) + body


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, *parts)


def set_of(items: Iterable[bytes]) -> bytes:
    """SET OF, elements sorted by their encodings (X.690 §11.6)."""
    return tlv(0x31, *sorted(items))


@lru_cache(maxsize=512)  # the same few dozen OIDs are written in every message
def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"not an OID: {dotted!r}")
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


def integer(value: int) -> bytes:
    # X.690 §8.3.2: minimal two's complement.  For a negative value the
    # magnitude that needs bits is ~value (e.g. -128 fits in one octet, 0x80).
    magnitude = value if value >= 0 else ~value
    size = magnitude.bit_length() // 8 + 1  # room for the sign bit
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


def octet_string(value: bytes) -> bytes:
    return tlv(0x04, value)


def printable_string(value: str) -> bytes:
    return tlv(0x13, value.encode("ascii"))


def utf8_string(value: str) -> bytes:
    return tlv(0x0C, value.encode("utf-8"))


def bit_string(value: bytes, unused_bits: int = 0) -> bytes:
    return tlv(0x03, bytes([unused_bits]), value)


NULL = b"\x05\x00"
TRUE = b"\x01\x01\xff"


def time(value: datetime) -> bytes:
    """UTCTime for 1950-2049, else GeneralizedTime (RFC 5280 §4.1.2.5); UTC, seconds."""
    from datetime import UTC

    value = value.astimezone(UTC)
    if 1950 <= value.year < 2050:
        return tlv(0x17, value.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, value.strftime("%Y%m%d%H%M%SZ").encode())


def explicit(number: int, inner: bytes) -> bytes:
    """[number] EXPLICIT (context-specific, constructed)."""
    return tlv(0xA0 | number, inner)


def algorithm(dotted: str, parameters: bytes | None = NULL) -> bytes:
    """AlgorithmIdentifier; parameters None = absent."""
    return seq(oid(dotted), parameters or b"")
