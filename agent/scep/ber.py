"""Reading DER and BER (X.690 §8) without a schema library, sans-IO.

Go's pkcs7 (micromdm) and Java's CMS generators send indefinite lengths and chunked
(constructed) OCTET STRINGs; the reader here takes both. It is what `agent.scep.cms` and
`agent.scep.messages` parse replies with: a TLV walker plus a few typed readers, because the
client needs a dozen fields of a CertRep and importing asn1crypto's schemas costs a one-shot
command more (~25 ms) than the whole parse. asn1crypto stays where callers want its objects
(`cms.load_content_info`, `VerifiedSignedData.attributes`, the lab CA); for those,
`ber_to_der_lengths` rewrites BER into the definite-length form it copes with.

Errors are ValueError: "Insufficient data ..." when the input ends inside an element (a
truncated message: `cms.asn1_errors` reports CRYPT_E_ASN1_EOD), any other text for a wrong
tag or shape (CRYPT_E_ASN1_BADTAG).
"""

from __future__ import annotations

from agent.scep.der import length as _length

# A CMS message has tens of elements per level; a reply with more is hostile (a 10 MB body of
# tiny TLVs would otherwise cost seconds of CPU).
MAX_ELEMENTS = 10_000
MAX_DEPTH = 64  # nesting of indefinite-length elements followed when looking for their end

Element = tuple[int, int, int, bytes, bytes]  # class, method (1 = constructed), tag, contents, full

# Universal tags used below (X.680 §8.4).
INTEGER, BIT_STRING, OCTET_STRING, NULL, OID, SEQUENCE, SET = 2, 3, 4, 5, 6, 16, 17


def _insufficient(wanted: int, available: int) -> ValueError:
    return ValueError(f"Insufficient data - {wanted} bytes requested but only {available} "
                      "available")


def _parse(data: bytes, end: int, pointer: int,
           depth: int = 0) -> tuple[int, int, int, int, int, int]:
    """One TLV: (class, method, tag, contents start, contents end, next pointer)."""
    if end - pointer < 2:
        raise _insufficient(2, end - pointer)
    first = data[pointer]
    cls, method, tag = first >> 6, (first >> 5) & 1, first & 0x1F
    pointer += 1
    if tag == 0x1F:  # high tag number form (X.690 §8.1.2.4)
        tag = 0
        while True:
            if pointer >= end:
                raise _insufficient(1, 0)
            byte = data[pointer]
            pointer += 1
            tag = (tag << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
            if tag >> 28:
                raise ValueError("tag number too large")
        if pointer >= end:
            raise _insufficient(1, 0)
    first_len = data[pointer]
    pointer += 1
    if first_len == 0x80:  # indefinite (X.690 §8.1.3.6): contents end at an end-of-contents
        if not method:
            raise ValueError("indefinite length on a primitive element")
        if depth >= MAX_DEPTH:
            raise ValueError(f"ASN.1 nesting deeper than {MAX_DEPTH} levels")
        start = inner = pointer
        while True:
            if end - inner < 2:
                raise _insufficient(2, end - inner)
            if data[inner] == 0 and data[inner + 1] == 0:
                return cls, method, tag, start, inner, inner + 2
            inner = _parse(data, end, inner, depth + 1)[5]
    if first_len & 0x80:
        count = first_len & 0x7F
        if count > 8 or count == 0x7F:
            raise ValueError(f"a length of {count} octets")
        if end - pointer < count:
            raise _insufficient(count, end - pointer)
        size = int.from_bytes(data[pointer: pointer + count], "big")
        pointer += count
    else:
        size = first_len
    if end - pointer < size:
        raise _insufficient(size, end - pointer)
    return cls, method, tag, pointer, pointer + size, pointer + size


def ber_elements(data: bytes) -> list[Element]:
    """The TLVs in `data` as (class, method, tag, contents, full encoding); BER accepted.

    Walks with a pointer rather than slicing the rest of the buffer for each element, which
    would make a 10 MB reply of tiny TLVs quadratic.
    """
    out: list[Element] = []
    pointer = 0
    end = len(data)
    while pointer < end:
        if len(out) >= MAX_ELEMENTS:
            raise ValueError(f"more than {MAX_ELEMENTS} elements at one level")
        cls, method, tag, start, stop, new_pointer = _parse(data, end, pointer)
        out.append((cls, method, tag, data[start:stop], data[pointer:new_pointer]))
        pointer = new_pointer
    return out


def one_element(data: bytes) -> Element:
    """`data` as exactly one TLV (nothing after it)."""
    elements = ber_elements(data)
    if len(elements) != 1:
        raise ValueError(f"{len(elements)} elements where one was expected" if elements
                         else "no element")
    return elements[0]


def expect(element: Element, tag: int, what: str, *, cls: int = 0,
           constructed: bool | None = None) -> bytes:
    """The contents of `element`, which must be [cls] `tag` (constructed as required)."""
    e_cls, method, e_tag, contents, _ = element
    if e_cls != cls or e_tag != tag or (constructed is not None and bool(method) != constructed):
        raise ValueError(f"{what}: found class {e_cls} tag {e_tag}, expected class {cls} "
                         f"tag {tag}")
    return contents


def sequence(element: Element, what: str) -> list[Element]:
    """The elements of a SEQUENCE."""
    return ber_elements(expect(element, SEQUENCE, what, constructed=True))


def read_oid(element: Element, what: str = "an OBJECT IDENTIFIER") -> str:
    """An OBJECT IDENTIFIER in dotted form (X.690 §8.19)."""
    contents = expect(element, OID, what, constructed=False)
    if not contents or contents[-1] & 0x80:
        raise ValueError(f"{what} is not a valid OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for byte in contents:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def read_int(element: Element, what: str = "an INTEGER") -> int:
    contents = expect(element, INTEGER, what, constructed=False)
    if not contents:
        raise ValueError(f"{what} is empty")
    return int.from_bytes(contents, "big", signed=True)


def read_octets(element: Element, what: str = "an OCTET STRING") -> bytes:
    """An OCTET STRING's value, primitive or constructed (chunks)."""
    expect(element, OCTET_STRING, what)
    return ber_octets(element[1], element[3])


def read_string(element: Element) -> str | None:
    """A PrintableString, UTF8String or IA5String as text; None for anything else (another
    type, or bytes its type does not allow)."""
    cls, method, tag, contents, _ = element
    encoding = {0x13: "latin-1", 0x0C: "utf-8", 0x16: "ascii"}.get(tag)
    if cls != 0 or method or encoding is None:
        return None
    try:
        return contents.decode(encoding)
    except UnicodeDecodeError:
        return None


def algorithm(element: Element, what: str) -> tuple[str, Element | None]:
    """An AlgorithmIdentifier: (dotted OID, parameters element or None when absent)."""
    parts = sequence(element, what)
    if not parts:
        raise ValueError(f"{what} is empty")
    return read_oid(parts[0], what), parts[1] if len(parts) > 1 else None


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
    if depth > MAX_DEPTH:
        raise ValueError(f"ASN.1 nesting deeper than {MAX_DEPTH} levels")
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


def ber_octets(method: int, contents: bytes, depth: int = 0) -> bytes:
    """The value of an OCTET STRING, primitive or constructed (X.690 §8.7.3: chunks)."""
    if method == 0:
        return contents
    if depth > MAX_DEPTH:
        raise ValueError(f"OCTET STRING chunks nested deeper than {MAX_DEPTH} levels")
    chunks = []
    for cls, m, tag, inner, _ in ber_elements(contents):
        if cls != 0 or tag != 4:
            raise ValueError("a constructed OCTET STRING holds something else than OCTET STRINGs")
        chunks.append(ber_octets(m, inner, depth + 1))
    return b"".join(chunks)
