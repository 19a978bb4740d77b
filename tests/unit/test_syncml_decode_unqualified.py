"""The decoder reads the usual message with ElementTree (agent/syncml/_expat.py) or with its
root's `xmlns="SYNCML:SYNCML1.2"` taken out (lxml builds unqualified element names faster), and
falls back to lxml on the bytes as sent for anything those readings cannot vouch for. Both
ways must give the same message, or the same error: checked on the codec's vectors, on hostile
input, on mutations of valid messages and on messages generated with namespaces declared,
redeclared and undeclared along the way.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.syncml import _decode, codec
from agent.syncml.messages import SyncMLMessage
from tests.unit.test_syncml_codec import HOSTILE
from tests.unit.test_syncml_fuzz import SEEDS, mutated

LIMIT = codec.DEFAULT_MAX_BYTES


def outcome(data: bytes, unqualified: bool) -> tuple[str, object]:
    try:
        return "message", _decode.decode(data, LIMIT, 16, unqualified=unqualified)
    except _decode.DecodeFailure as exc:
        return "error", str(exc)


def same(data: bytes) -> tuple[str, object]:
    fast = outcome(data, True)
    assert fast == outcome(data, False)
    return fast


@pytest.mark.parametrize("data", SEEDS)
def test_codec_vectors_decode_alike(data: bytes) -> None:
    kind, message = same(data)
    assert kind == "message" and isinstance(message, SyncMLMessage)


@pytest.mark.parametrize("data", [w for w, _ in HOSTILE.values()])
def test_hostile_input_fails_alike(data: bytes) -> None:
    assert same(data)[0] == "error"


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_messages_decode_alike(data: bytes) -> None:
    same(data)


ROOT = '<SyncML xmlns="SYNCML:SYNCML1.2">'
HEADER = ("<SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto><SessionID>1</SessionID>"
          "<MsgID>2</MsgID><Target><LocURI>dev</LocURI></Target><Source><LocURI>https://s/x"
          "</LocURI></Source></SyncHdr>")
# Namespace games the reading must survive: a redeclared default, an undeclared one, a prefix,
# foreign elements named like SyncML's, MetInf children with and without their namespace,
# Data holding elements (with and without namespaces), a bare SyncML root.
PARTS = [
    "<Get><CmdID>1</CmdID><Item><Target><LocURI>./DevInfo/Man</LocURI></Target></Item></Get>",
    '<Get xmlns="SYNCML:SYNCML1.2"><CmdID>2</CmdID><Item><Target><LocURI> ./x </LocURI>'
    "</Target></Item></Get>",
    '<Get xmlns=""><CmdID>3</CmdID><Item><Target><LocURI>./y</LocURI></Target></Item></Get>',
    '<s:Replace xmlns:s="SYNCML:SYNCML1.2"><s:CmdID>4</s:CmdID><s:Item><s:Target><s:LocURI>'
    './z</s:LocURI></s:Target><s:Data>1</s:Data></s:Item></s:Replace>',
    '<Replace><CmdID>5</CmdID><Item><Target><LocURI>./a</LocURI></Target><Meta><Format '
    'xmlns="syncml:metinf">int</Format><Type>text/plain</Type></Meta><Data>7</Data></Item>'
    "</Replace>",
    '<Add><CmdID>6</CmdID><Item><Target><LocURI xmlns="urn:other">./b</LocURI></Target>'
    "<Data><![CDATA[<x>&amp;</x>]]></Data></Item></Add>",
    "<Add><CmdID>7</CmdID><Item><Target><LocURI>./c</LocURI></Target><Data><wap>"
    '<p a="1">t</p></wap></Data></Item></Add>',
    '<Add><CmdID>8</CmdID><Item><Target><LocURI>./d</LocURI></Target><Data><w xmlns="urn:w">'
    "<p/></w></Data></Item></Add>",
    '<Foo xmlns="urn:foo"><CmdID>9</CmdID></Foo>', "<Bar><CmdID>10</CmdID></Bar>",
    "<Atomic><CmdID>11</CmdID><Delete><CmdID>12</CmdID><Item><Target><LocURI>./e</LocURI>"
    "</Target></Item></Delete></Atomic>",
    "<Status><CmdID>13</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef><Cmd>SyncHdr</Cmd>"
    "<Data>200</Data></Status>",
    "<Alert><CmdID>14</CmdID><Data>1226</Data></Alert>",
    "<Get><CmdID>15<x/></CmdID></Get>", "<Get><CmdID>16</CmdID><Item><Target><LocURI>a<b/>"
    "</LocURI></Target></Item></Get>",
    "<Final/>",
]


@st.composite
def namespaced(draw: st.DrawFn) -> bytes:
    body = "".join(draw(st.lists(st.sampled_from(PARTS), max_size=6)))
    root = draw(st.sampled_from([ROOT, ROOT, "<SyncML>", '<SyncML xmlns="urn:x">',
                                 '<SyncML xmlns="SYNCML:SYNCML1.2" xmlns:m="syncml:metinf">']))
    prolog = draw(st.sampled_from(["", '<?xml version="1.0" encoding="UTF-8"?>', "<!-- c -->\n",
                                   "\ufeff"]))
    return f"{prolog}{root}{HEADER}<SyncBody>{body}</SyncBody></SyncML>".encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(namespaced())
def test_namespace_variants_decode_alike(data: bytes) -> None:
    same(data)


def test_the_usual_message_takes_the_unqualified_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    parse = _decode._parse

    def spy(data: bytes, max_nesting: int, *, unqualified: bool) -> SyncMLMessage:
        taken.append(unqualified)
        return parse(data, max_nesting, unqualified=unqualified)

    monkeypatch.setattr(_decode, "_parse", spy)
    # (a comment first: otherwise the usual message is read by _expat, not lxml)
    prolog = "<!-- from the server -->"
    message = codec.decode(f"{prolog}{ROOT}{HEADER}<SyncBody>{PARTS[0]}{PARTS[4]}</SyncBody>"
                           "</SyncML>".encode())
    assert taken == [True] and len(message.body) == 2
    taken.clear()
    codec.decode(f"{prolog}{ROOT}{HEADER}<SyncBody>{PARTS[6]}</SyncBody></SyncML>".encode())
    assert taken == [True, False]  # Data with elements: read again as sent
