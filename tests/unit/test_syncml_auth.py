"""SyncML credentials: digests against known answers, scheme parsing, nonce decoding."""

from __future__ import annotations

import pytest

from agent.syncml.auth import (
    AuthScheme,
    Credentials,
    basic_digest,
    decode_nonce,
    make_cred,
    md5_digest,
    scheme_of,
)
from agent.syncml.chunks import split_text, utf8_len
from agent.syncml.codec import escape
from agent.syncml.messages import Meta


def test_md5_known_answer() -> None:
    # The worked example of the SyncML Representation Protocol (auth-md5, "Bruce2"/"OhBehave",
    # nonce "Nonce"): B64(H(B64(H(user:password)):nonce)).
    assert md5_digest("Bruce2", "OhBehave", b"Nonce") == "Zz6EivR3yeaaENcRN6lpAQ=="


def test_basic() -> None:
    assert basic_digest("Bruce2", "OhBehave") == "QnJ1Y2UyOk9oQmVoYXZl"


@pytest.mark.parametrize("text,expected", [("Tm9uY2U=", b"Nonce"), (" AAE= ", b"\x00\x01"),
                                           ("not base64!", None), ("", b"")])
def test_decode_nonce(text: str, expected: bytes | None) -> None:
    assert decode_nonce(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("syncml:auth-md5", AuthScheme.MD5), ("SyncML:Auth-Basic", AuthScheme.BASIC),
    (" syncml:auth-basic ", AuthScheme.BASIC), ("syncml:auth-MAC", None), (None, None)])
def test_scheme_of(text: str | None, expected: AuthScheme | None) -> None:
    assert scheme_of(text) == expected


def test_make_cred() -> None:
    creds = Credentials("Bruce2", "OhBehave")
    md5 = make_cred(creds, AuthScheme.MD5, b"Nonce")
    assert md5 is not None and md5.data == "Zz6EivR3yeaaENcRN6lpAQ=="
    assert md5.meta == Meta(format="b64", type="syncml:auth-md5")
    assert make_cred(creds, AuthScheme.MD5, None) is None  # md5 needs the server's nonce
    basic = make_cred(creds, AuthScheme.BASIC, None)
    assert basic is not None and basic.meta.type == "syncml:auth-basic"


@pytest.mark.parametrize("text,budget", [("a" * 1000, 100), ("<&>" * 300, 100),
                                         ("é✓𝄞" * 200, 101), ("\r\n" * 100, 7), ("x", 0)])
def test_split_text_respects_the_escaped_byte_budget(text: str, budget: int) -> None:
    head, rest = split_text(text, budget)
    assert head and head + rest == text
    assert utf8_len(escape(head)) <= max(budget, utf8_len(escape(text[0])))
    if rest:  # and it takes as much as fits
        assert utf8_len(escape(text[: len(head) + 1])) > budget
