"""agent.scep.ber: the DER/BER reader replies are parsed with (no schema library)."""

from __future__ import annotations

import pytest
from asn1crypto import core, parser
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.scep import ber, der


@pytest.mark.parametrize(("data", "expected"), [
    (b"\x02\x01\x05", [(0, 0, 2, b"\x05")]),
    (b"\x04\x81\x03abc", [(0, 0, 4, b"abc")]),  # long form where short would do (BER)
    (b"\x04\x82\x00\x01a\x05\x00", [(0, 0, 4, b"a"), (0, 0, 5, b"")]),
    (b"\x30\x80\x02\x01\x01\x00\x00", [(0, 1, 16, b"\x02\x01\x01")]),  # indefinite
    (b"\xa0\x80\x30\x80\x00\x00\x00\x00", [(2, 1, 0, b"\x30\x80\x00\x00")]),  # nested
    (b"\x9f\x81\x00\x01z", [(2, 0, 128, b"z")]),  # high tag number form
    (b"\x5f\x1f\x00", [(1, 0, 31, b"")]),
])
def test_elements(data: bytes, expected: list[tuple[int, int, int, bytes]]) -> None:
    got = ber.ber_elements(data)
    assert [e[:4] for e in got] == expected
    assert b"".join(e[4] for e in got) == data  # the full encodings tile the input


@pytest.mark.parametrize(("data", "truncated"), [
    (b"\x30", True),
    (b"\x30\x05\x02\x01", True),
    (b"\x04\x84\x00\x00", True),
    (b"\x30\x80\x02\x01\x01", True),  # no end-of-contents
    (b"\x9f", True),
    (b"\x04\x80abc\x00\x00", False),  # indefinite length on a primitive
    (b"\x04\x89" + b"\x00" * 9, False),  # a length of 9 octets
    (b"\x04\xff", False),
])
def test_malformed(data: bytes, truncated: bool) -> None:
    with pytest.raises(ValueError) as err:
        ber.ber_elements(data)
    assert ("Insufficient data" in str(err.value)) is truncated  # -> CRYPT_E_ASN1_EOD


def test_limits() -> None:
    with pytest.raises(ValueError, match="elements at one level"):
        ber.ber_elements(b"\x05\x00" * (ber.MAX_ELEMENTS + 1))
    deep = b"\x30\x80" * (ber.MAX_DEPTH + 2) + b"\x00\x00" * (ber.MAX_DEPTH + 2)
    with pytest.raises(ValueError, match="deeper"):
        ber.ber_elements(deep)
    chunks = b"\x24\x80" * (ber.MAX_DEPTH + 2) + b"\x00\x00" * (ber.MAX_DEPTH + 2)
    with pytest.raises(ValueError, match="deeper"):
        ber.ber_octets(1, ber.one_element(chunks)[3])


@pytest.mark.parametrize("dotted", ["1.2.840.113549.1.7.2", "2.5.4.3", "0.9.2342.19200300.100.1.1",
                                    "2.999.1", "1.3.6.1.4.1.311.21.8.123456789.1"])
def test_read_oid(dotted: str) -> None:
    assert ber.read_oid(ber.one_element(der.oid(dotted))) == dotted
    assert ber.read_oid(ber.one_element(der.oid(dotted))) == \
        core.ObjectIdentifier.load(der.oid(dotted)).dotted


@pytest.mark.parametrize("bad", [b"\x06\x00", b"\x06\x01\x81", b"\x02\x01\x01"])
def test_read_oid_refuses(bad: bytes) -> None:
    with pytest.raises(ValueError):
        ber.read_oid(ber.one_element(bad))


@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, -129, 2**159 + 12345])
def test_read_int(value: int) -> None:
    assert ber.read_int(ber.one_element(der.integer(value))) == value


@pytest.mark.parametrize(("encoded", "text"), [
    (der.printable_string("3"), "3"),
    (der.utf8_string("Zoë"), "Zoë"),
    (b"\x16\x03abc", "abc"),  # IA5String
    (b"\x16\x01\xff", None),  # not ASCII
    (b"\x0c\x01\xff", None),  # not UTF-8
    (der.octet_string(b"3"), None),
    (b"\x33\x03\x13\x01\x33", None),  # constructed
])
def test_read_string(encoded: bytes, text: str | None) -> None:
    assert ber.read_string(ber.one_element(encoded)) == text


def test_read_octets_takes_chunks() -> None:
    assert ber.read_octets(ber.one_element(b"\x24\x80\x04\x01a\x04\x02bc\x00\x00")) == b"abc"
    with pytest.raises(ValueError):
        ber.read_octets(ber.one_element(der.printable_string("x")))


def test_one_element() -> None:
    assert ber.one_element(b"\x05\x00")[2] == 5
    for bad in (b"", b"\x05\x00\x05\x00"):
        with pytest.raises(ValueError):
            ber.one_element(bad)


# --- the same answers as asn1crypto's parser, which parsed replies before -------------------

def _tlv(tag: int, body: bytes, form: str) -> bytes:
    if form == "indefinite" and tag & 0x20:
        return bytes([tag, 0x80]) + body + b"\x00\x00"
    if form == "long":
        size = len(body).to_bytes(2, "big")
        return bytes([tag, 0x82]) + size + body
    return der.tlv(tag, body)


_FORMS = st.sampled_from(["definite", "long", "indefinite"])
_LEAF = st.builds(_tlv,
                  st.sampled_from([0x02, 0x04, 0x05, 0x06, 0x13, 0x80, 0x81]),
                  st.binary(max_size=20), _FORMS)
_TREE = st.recursive(_LEAF, lambda kids: st.builds(
    lambda tag, parts, form: _tlv(tag, b"".join(parts), form),
    st.sampled_from([0x30, 0x31, 0xA0, 0xA3, 0x24]), st.lists(kids, max_size=4), _FORMS),
    max_leaves=12)


def _asn1crypto(data: bytes) -> list[tuple[int, int, int, bytes, bytes]] | str:
    out = []
    pointer = 0
    try:
        while pointer < len(data):
            (cls, method, tag, _, contents, _), new = parser._parse(data, len(data), pointer)
            out.append((cls, method, tag, contents, data[pointer:new]))
            pointer = new
    except ValueError as exc:
        return "truncated" if "Insufficient data" in str(exc) else "malformed"
    return out


def _ours(data: bytes) -> list[tuple[int, int, int, bytes, bytes]] | str:
    try:
        return ber.ber_elements(data)
    except ValueError as exc:
        return "truncated" if "Insufficient data" in str(exc) else "malformed"


@settings(max_examples=300, deadline=None)
@given(st.lists(_TREE, min_size=1, max_size=3), st.integers(min_value=0, max_value=400))
def test_same_as_asn1crypto(trees: list[bytes], cut: int) -> None:
    data = b"".join(trees)
    for sample in (data, data[: cut % (len(data) + 1)]):
        assert _ours(sample) == _asn1crypto(sample)
