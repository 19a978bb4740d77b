"""Fuzzing the SyncML decoder: any input gives a message or SyncMLDecodeError, quickly.

Runs in CI with a bounded budget (max_examples, per-example deadline).
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.syncml import codec
from agent.syncml.codec import SyncMLDecodeError
from agent.syncml.messages import SyncMLMessage
from tests.unit.test_syncml_codec import (
    INTUNE_STYLE,
    ROUND_TRIPS,
    SEED_001_ATOMIC,
    WIRE_VECTORS,
    XML_DATA,
)

SEEDS = [INTUNE_STYLE, SEED_001_ATOMIC, XML_DATA] + [codec.encode(m) for m in ROUND_TRIPS.values()]
SEEDS += [w for w, _ in WIRE_VECTORS.values()]
FUZZ = settings(max_examples=300, deadline=500, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOKENS = [b"<", b">", b"</", b"/>", b"&", b"&amp;", b"&#0;", b"&#x10FFFF;", b"<![CDATA[",
          b"]]>", b"<!DOCTYPE x>", b"<!ENTITY a 'b'>", b"<?xml version='1.0'?>", b"\x00",
          b"\xff", b"\xc3", b"<Final/>", b"<MoreData/>", b"<Data>", b"</Data>", b"<CmdID>",
          b"</CmdID>", b"<Atomic>", b"</Atomic>", b"<Meta>", b"<Size>9</Size>", b"xmlns='x'",
          b"<Status><Data>x</Data></Status>", b"<SyncHdr>", b"\xef\xbb\xbf", b"<!--", b"-->"]


def _check(data: bytes) -> None:
    start = time.perf_counter()
    try:
        msg = codec.decode(data)
    except SyncMLDecodeError as exc:
        assert exc.message.startswith("invalid SyncML from the server: ")
    else:
        assert isinstance(msg, SyncMLMessage)
        # Whatever decodes must re-encode and decode to the same message.
        assert codec.decode(codec.encode(msg)) == msg
    assert time.perf_counter() - start < 0.5


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "token", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete" and data:
            del data[pos: pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "token":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and data:
            end = min(len(data), pos + draw(st.integers(1, 200)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_valid_messages(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.text(max_size=200), st.sampled_from(SEEDS))
def test_arbitrary_text_in_data(text: str, seed: bytes) -> None:
    """Text the encoder must escape: decode(encode(x)) keeps it (CR, <, & ...) or U+FFFD."""
    msg = codec.decode(seed)
    from agent.syncml.messages import Item, Results

    out = SyncMLMessage(msg.header, (Results("1", "1", "2", (Item(source="./x", data=text),)),))
    back = codec.decode(codec.encode(out)).body[0]
    assert isinstance(back, Results)
    expected = codec.INVALID_XML.sub("\ufffd", text)
    assert back.items[0].data == expected
