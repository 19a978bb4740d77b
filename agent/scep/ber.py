"""BER tolerance (X.690 §8): read what Go and Java CMS code sends, sans-IO.

Go's pkcs7 (micromdm) and Java's CMS generators send indefinite lengths and chunked
(constructed) OCTET STRINGs; asn1crypto copes with only some of that (not inside CHOICEs, not
for IMPLICIT-tagged strings), so replies are re-encoded with definite lengths before parsing.
"""

from __future__ import annotations

from asn1crypto import parser

from agent.scep.der import length as _length

# A CMS message has tens of elements per level; a reply with more is hostile (a 10 MB body of
# tiny TLVs would otherwise cost seconds of CPU).
MAX_ELEMENTS = 10_000


def ber_elements(data: bytes) -> list[tuple[int, int, int, bytes, bytes]]:
    """The TLVs in `data` as (class, method, tag, contents, full encoding); BER accepted.

    Walks with a pointer (asn1crypto's parser core) rather than slicing the rest of the
    buffer for each element, which would make a 10 MB reply of tiny TLVs quadratic.
    """
    out: list[tuple[int, int, int, bytes, bytes]] = []
    pointer = 0
    end = len(data)
    while pointer < end:
        if len(out) >= MAX_ELEMENTS:
            raise ValueError(f"more than {MAX_ELEMENTS} elements at one level")
        (cls, method, tag, _, contents, _), new_pointer = parser._parse(
            data, end, pointer)
        out.append((cls, method, tag, contents, data[pointer:new_pointer]))
        pointer = new_pointer
    return out


def _identifier(full: bytes) -> bytes:
    """The identifier octets of a TLV (one byte, or more for tag numbers >= 31)."""
    if full[0] & 0x1F != 0x1F:
        return full[:1]
    end = 1
    while full[end] & 0x80:
        end += 1
    return full[: end + 1]


def ber_to_der_lengths(data: bytes, depth: int = 0) -> bytes:
    """Re-encode BER with definite lengths and universal OCTET STRINGs in one piece.

    Go and Java CMS code sends indefinite lengths and chunked (constructed) OCTET STRINGs
    (X.690 §8.1.3.6, §8.7.3); asn1crypto copes with only some of it (not inside CHOICEs),
    so the structure is rewritten first. Values are untouched, and DER input (certificates
    included) comes out byte for byte the same. Context-tagged constructed strings (the
    [0] IMPLICIT encryptedContent) stay constructed: `ber_octets` reads those.
    """
    if depth > 64:
        raise ValueError("ASN.1 nesting deeper than 64 levels")
    out = bytearray()
    for cls, method, tag, contents, full in ber_elements(data):
        if method == 0:
            ident = _identifier(full)
            length = _length(len(contents))
            if len(full) == len(ident) + len(length) + len(contents):
                out += full  # already the minimal (DER) length encoding
            else:
                out += ident + length + contents
            continue
        if cls == 0 and tag == 16 and full[1] != 0x80 and _is_x509(contents):
            out += full  # a certificate or CRL is signed DER: nothing to rewrite, skip the walk
            continue
        if cls == 0 and tag == 4:  # constructed OCTET STRING: one primitive value
            value = ber_octets(1, contents)
            out += b"\x04" + _length(len(value)) + value
            continue
        inner = ber_to_der_lengths(contents, depth + 1)
        out += _identifier(full) + _length(len(inner)) + inner
    return bytes(out)


def _is_x509(contents: bytes) -> bool:
    """Contents of a Certificate/CRL: a definite-length TBS SEQUENCE starting with v2/v3."""
    if len(contents) < 8 or contents[0] != 0x30 or contents[1] == 0x80:
        return False
    skip = 2 + (contents[1] & 0x7F if contents[1] & 0x80 else 0)
    return contents[skip: skip + 4] in (b"\xa0\x03\x02\x01", b"\x02\x01\x01\x30")


def ber_octets(method: int, contents: bytes) -> bytes:
    """The value of an OCTET STRING, primitive or constructed (X.690 §8.7.3: chunks)."""
    if method == 0:
        return contents
    chunks = []
    for cls, m, tag, inner, _ in ber_elements(contents):
        if cls != 0 or tag != 4:
            raise ValueError("a constructed OCTET STRING holds something else than OCTET STRINGs")
        chunks.append(ber_octets(m, inner))
    return b"".join(chunks)
