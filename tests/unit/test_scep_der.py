"""agent.scep.der against asn1crypto's encoder: the hand-built DER must be the same bytes."""

from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import core, x509
from hypothesis import given
from hypothesis import strategies as st

from agent.scep import der


@pytest.mark.parametrize("dotted", ["1.2.840.113549.1.7.2", "2.5.4.3", "0.9.2342.19200300.100.1.25",
                                    "2.16.840.1.113733.1.9.7", "1.3.6.1.4.1.311.20.2.3",
                                    "2.999.1", "1.2.840.10045.4.3.2"])
def test_oid(dotted: str) -> None:
    assert der.oid(dotted) == core.ObjectIdentifier(dotted).dump()


@pytest.mark.parametrize("bad", ["1", "3.1", "1.40", "x.y"])
def test_bad_oid(bad: str) -> None:
    with pytest.raises(ValueError):
        der.oid(bad)


# The octet boundaries are where minimal two's complement goes wrong (-128 is
# one octet, 0x80; 128 needs two, 0x00 0x80); hypothesis does not always hit them.
@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, -128, -129, 255, 256, -256, -257,
                                   32767, 32768, -32768, -32769, 2**63, -(2**63), -(2**63) - 1])
def test_integer_octet_boundaries(value: int) -> None:
    assert der.integer(value) == core.Integer(value).dump()


@given(st.integers(min_value=-(2**200), max_value=2**200))
def test_integer(value: int) -> None:
    assert der.integer(value) == core.Integer(value).dump()


@given(st.binary(max_size=70000))
def test_octet_string_lengths(value: bytes) -> None:
    assert der.octet_string(value) == core.OctetString(value).dump()


@pytest.mark.parametrize(("when", "tag"), [
    (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), 0x17),
    (dt.datetime(1950, 1, 1, tzinfo=dt.UTC), 0x17),
    (dt.datetime(2050, 1, 1, tzinfo=dt.UTC), 0x18),
    (dt.datetime(2026, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))), 0x17),
])
def test_time(when: dt.datetime, tag: int) -> None:
    encoded = der.time(when)
    assert encoded[0] == tag
    assert x509.Time.load(encoded).native == when.replace(microsecond=0)


def test_set_of_is_sorted() -> None:
    a, b = der.printable_string("b"), der.integer(5)
    assert der.set_of([a, b]) == der.tlv(0x31, b, a)
