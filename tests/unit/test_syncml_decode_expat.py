"""agent/syncml/_expat.py reads the usual message with ElementTree; lxml stays the parser of
record. Whatever `_expat` accepts, lxml must accept too and decode to the same message, and
whatever it declines is decoded by lxml as before: checked on messages in the usual shape and
on those messages mutated at the character level (entities, character references, CDATA,
comments, processing instructions, attributes, namespace declarations, invalid characters,
declarations before the root), where the two parsers are most likely to disagree.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.syncml import _decode, _expat, codec
from agent.syncml.messages import (
    Cmd,
    Item,
    ItemCommand,
    Meta,
    Status,
    SyncHdr,
    SyncMLMessage,
)
from tests.unit.test_syncml_codec import HOSTILE

NC = "./Vendor/MSFT/NodeCache/MS%20DM%20Server"


def usual(n: int = 6) -> bytes:
    commands = [ItemCommand(Cmd.GET, f"{i:08x}-1b2c", (Item(target="./DevInfo/Man"),))
                for i in range(n)]
    commands += [ItemCommand(Cmd.REPLACE, f"r{i}", (Item(
        target=f"{NC}/Nodes/{i}/ExpectedValue", meta=Meta(format="chr"), data=f"10.0.{i}"),))
        for i in range(n)]
    return codec.encode(SyncMLMessage(
        SyncHdr("1", "2", "dev", "https://mdm.example.test/x"),
        (Status("1", "1", "0", "SyncHdr", 200), *commands)))


USUAL = usual()
TOKENS = [b"&amp;", b"&lt;", b"&#65;", b"&#x10FFFF;", b"&#0;", b"&#xFFFE;", b"&bogus;",
          b"<![CDATA[x<y]]>", b"]]>", b"<!-- c -->", b"<?pi data?>", b"<?xml version='1.0'?>",
          b' a="1"', b' a="1" a="2"', b' xmlns:p="urn:p"', b' xmlns:p=""', b' xmlns=""',
          b' xmlns:xml="urn:x"', b' p:a="1"', b"\xef\xbf\xbe", b"\xef\xbf\xbf", b"\r\n", b"\r",
          b"\x01", b"\t", b"\xc2\x85", b"\xe2\x80\xa8", b"<X/>", b"<Data>x</Data>", b"<", b">",
          b"&", b'<?xml version="2.0"?>', b"\xef\xbb\xbf", b"<!DOCTYPE x>", b"<MoreData/>"]


PROLOGS = [b'<?xml version="1.0"?>', b"<?xml version='1.0' encoding='UTF-8'?>",
           b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8" standalone="yes"?>\r\n',
           b"\xef\xbb\xbf", b"\n  ", b'<?xml  version = "1.0"  encoding="Utf-8" ?>\n']
# Where the parsers' character-level rules matter without breaking the message's shape:
# inside text, and inside start tags (attributes, namespace declarations).
TEXT_AT = [m.start() + k for m in re.finditer(rb">[^<]+<", USUAL)
           for k in range(1, m.end() - m.start())]
TAG_AT = [m.end() - 1 for m in re.finditer(rb"<[A-Za-z][^>/]*>", USUAL)]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """Tokens inserted in text or start tags (mostly), or anywhere; bytes deleted; a prolog
    first, sometimes (the mutations then land in the message after it)."""
    data = bytearray(USUAL)
    edits = []
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["text", "text", "tag", "anywhere"]))
        pos = draw(st.sampled_from(TEXT_AT if where == "text" else TAG_AT)) \
            if where != "anywhere" else draw(st.integers(0, len(data)))
        edits.append((pos, draw(st.sampled_from(TOKENS))))
    for pos, token in sorted(edits, reverse=True):
        data[pos:pos] = token
    if draw(st.integers(0, 4)) == 0:
        pos = draw(st.integers(0, len(data)))
        del data[pos: pos + draw(st.integers(1, 8))]
    if draw(st.integers(0, 3)) == 0:
        data[0:0] = draw(st.sampled_from(PROLOGS))
    return bytes(data)


def lxml_outcome(data: bytes) -> tuple[str, object]:
    try:
        return "message", _decode.decode(data, codec.DEFAULT_MAX_BYTES, 16, unqualified=False)
    except _decode.DecodeFailure as exc:
        return "error", str(exc)


def check(data: bytes) -> bool:
    """True when the decoder had _expat read the message (and then lxml agrees); the whole
    decoder must give lxml's outcome either way."""
    read: list[SyncMLMessage] = []
    original = _expat.decode_usual

    def spy(data: bytes, root_at: int, max_nesting: int) -> SyncMLMessage | None:
        message = original(data, root_at, max_nesting)
        if message is not None:
            read.append(message)
        return message

    _expat.decode_usual = spy  # type: ignore[assignment]
    try:
        whole: tuple[str, object] = ("message", codec.decode(data))
    except codec.SyncMLDecodeError as exc:
        whole = ("error", exc.message.removeprefix("invalid SyncML from the server: "))
    finally:
        _expat.decode_usual = original  # type: ignore[assignment]
    reference = lxml_outcome(data)
    assert whole == reference
    if read:
        assert reference == ("message", read[0])
    return bool(read)


def test_the_usual_message_is_read_by_expat() -> None:
    assert check(USUAL)
    assert check(usual(25))  # the bench's size: 50 commands


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutations_decode_as_lxml_decodes_them(data: bytes) -> None:
    check(data)


def test_mutations_reach_both_sides() -> None:
    """The mutation test is not vacuous: some mutated messages stay expat's, some do not."""
    taken = [check(bytes(USUAL[:pos]) + token + bytes(USUAL[pos:]))
             for token in TOKENS for pos in (USUAL.index(b"<Data>") + 6, 40)]
    assert any(taken) and not all(taken)


@pytest.mark.parametrize("data", [w for w, _ in HOSTILE.values()] + [
    b'<?xml version="2.0"?>' + USUAL,  # expat would take it; libxml2 refuses the version
    USUAL.replace(b"<CmdID>", b"<" + b"C" * 50001 + b"/><CmdID>", 1),  # libxml2: name too long
])
def test_hostile_input_is_left_to_lxml(data: bytes) -> None:
    assert not check(data)


@pytest.mark.parametrize("prolog", PROLOGS)
def test_the_usual_prologs_are_read_by_expat(prolog: bytes) -> None:
    assert check(prolog + USUAL)


@pytest.mark.parametrize("prolog", [
    b'<?xml version="1.1"?>', b'<?xml version="2.0"?>', b'<?xml version="1.0" encoding="x"?>',
    b'<?xml version="1.0" encoding="ISO-8859-1"?>', b'<?xml version="1.0" standalone="maybe"?>',
    b"<!-- c -->", b'<?pi x?>', b'<?xml version="1.0"?><!-- c -->', b'<?xml encoding="utf-8"?>',
    b'<?xml version="1.0"?><?xml version="1.0"?>', b"\xef\xbb\xbf\xef\xbb\xbf",
    b'<?xml version="1.0" standalone="yes" encoding="utf-8"?>',  # out of order
])
def test_other_prologs_are_left_to_lxml(prolog: bytes) -> None:
    assert not check(prolog + USUAL)


@pytest.mark.parametrize("declined", [
    b"<!-- a comment first -->" + USUAL,
    USUAL.replace(b"<SyncBody>", b"<SyncBody><Alert><CmdID>1</CmdID><Data>1222</Data></Alert>"),
    USUAL.replace(b"<SyncBody>", b"<SyncBody><Atomic><CmdID>a</CmdID></Atomic>"),
    USUAL.replace(b"</VerProto>", b"</VerProto><Cred><Data>x</Data></Cred>"),
    USUAL.replace(b"<Final/>", b"<Final><X/></Final>"),
    usual(200),  # over MAX_BYTES
])
def test_other_messages_are_left_to_lxml(declined: bytes) -> None:
    assert not check(declined)


HEADER = (b"<SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto><SessionID>1</SessionID>"
          b"<MsgID>2</MsgID><Target><LocURI>dev</LocURI></Target><Source><LocURI>"
          b"https://mdm.example.test/x</LocURI></Source></SyncHdr>")
SYNCHDR_STATUS = (b"<Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef><Cmd>SyncHdr"
                  b"</Cmd><Data>200</Data></Status>")


@pytest.mark.parametrize(("old", "new"), [
    (b"", b""),  # the usual header and Status (read directly) must match lxml too
    (b"<MsgID>2</MsgID>", b"<MsgID> 2 </MsgID>"),
    (b"<SessionID>1</SessionID>", b"<SessionID> </SessionID>"),  # an error, from lxml
    (b"<MsgID>2</MsgID>", b""),
    (b"</Source>", b"</Source><Meta><MaxMsgSize xmlns=\"syncml:metinf\">9</MaxMsgSize></Meta>"),
    (b"</Source>", b"</Source><RespURI> https://r/ </RespURI><NoResp/>"),
    (b"<LocURI>dev</LocURI>", b"<LocURI>dev</LocURI><LocName>n</LocName>"),
    (b"<LocURI>dev</LocURI>", b"<LocURI> dev </LocURI><LocURI>d2</LocURI>"),
    (b"<VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto>", b"<VerProto>DM/1.2</VerProto>"
     b"<VerDTD>1.2</VerDTD>"),
    (b"<VerDTD>1.2</VerDTD>", b"<VerDTD>1.2</VerDTD><VerDTD>9</VerDTD>"),
    (b"<Data>200</Data>", b"<Data> 212 </Data>"),
    (b"<Data>200</Data>", b"<Data>2OO</Data>"),
    (b"<Data>200</Data>", b"<Data>" + b"9" * 13 + b"</Data>"),
    (b"<Data>200</Data>", b"<Data>\xd9\xa1</Data>"),  # a non-ASCII digit
    (b"<Data>200</Data>", b"<Data>200</Data><TargetRef>./a</TargetRef>"),
    (b"<Data>200</Data>", b""),
    (b"<CmdID>1</CmdID><MsgRef>1</MsgRef>", b"<MsgRef>1</MsgRef><CmdID>1</CmdID>"),
    (b"<CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef><Cmd>SyncHdr</Cmd>",
     b"<CmdID> 1 </CmdID><MsgRef>\n1 </MsgRef><CmdRef> 0</CmdRef><Cmd> SyncHdr </Cmd>"),
    (b"<VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto><SessionID>1</SessionID>",
     b"<VerDTD> 1.2 </VerDTD><VerProto> DM/1.2</VerProto><SessionID> 1 </SessionID>"),
])
def test_header_and_status_variants_decode_as_lxml(old: bytes, new: bytes) -> None:
    message = USUAL.replace(USUAL[USUAL.index(b"<SyncHdr>"):USUAL.index(b"<SyncBody>")],
                            HEADER)
    message = message.replace(b"<SyncBody>", b"<SyncBody>" + SYNCHDR_STATUS, 1)
    if old:
        assert old in message
        message = message.replace(old, new, 1)
    check(message)
