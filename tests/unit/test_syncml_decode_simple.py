"""`_Decoder.simple_command` (the usual `<CmdID>` + one `<Item>` shape, read directly) builds
exactly what the general `item_command` walk builds, and leaves everything else to it.

Commands are generated from a grammar that mixes the usual shape with everything next to it
(order, duplicates, namespaces, elements inside text, MoreData, Source, command-level Meta,
unknown elements); each document is decoded with the short path and with it switched off,
in both readings (root namespace declaration kept or taken out), and must give the same
message or the same error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.syncml import _decode, codec
from agent.syncml.messages import ItemCommand

HEADER = ("<SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto><SessionID>1</SessionID>"
          "<MsgID>2</MsgID><Target><LocURI>dev</LocURI></Target><Source><LocURI>https://s/x"
          "</LocURI></Source></SyncHdr>")
TEXT = st.sampled_from(["", " 7 ", "./DevInfo/Man", "a&amp;b", "<![CDATA[x<y]]>", "10.0.1",
                        "\n  ./Vendor/MSFT/NodeCache/MS%20DM%20Server/Nodes/1/ExpectedValue  "])


CLEAN_META = st.sampled_from([
    '<Format xmlns="syncml:metinf">chr</Format>', "<Format>int</Format>",
    '<Type xmlns="syncml:metinf">text/plain</Type>', "<Type>application/x-nodemon-sha256</Type>"])
ODD_META = st.sampled_from([
    '<Format xmlns="urn:other">b64</Format>', '<Size xmlns="syncml:metinf">5</Size>',
    "<MetInf><Format>chr</Format></MetInf>", "<Format>chr<x/></Format>", "<Mark>x</Mark>",
    "<Format>bool</Format>", '<Type xmlns="syncml:metinf">b</Type>'])
ODD_ITEM = st.sampled_from([
    "<MoreData/>", "<Source><LocURI>./s</LocURI></Source>", "<Data>again</Data>",
    "<Target><LocURI>./t2</LocURI></Target>", "<Meta/>", '<Data xmlns="urn:d">d</Data>',
    "<Unknown>u</Unknown>", "<Data><x>1</x></Data>"])
ODD_TARGET = st.sampled_from(["<LocName>n</LocName>", "<LocURI>2</LocURI>", "<X/>"])
ODD_COMMAND = st.sampled_from([
    "<NoResp/>", "<Meta><Format>chr</Format></Meta>", "<CmdID>x</CmdID>",
    "<Cred><Meta><Type>syncml:auth-basic</Type></Meta><Data>x</Data></Cred>",
    "<Item><Target><LocURI>./2</LocURI></Target></Item>", "<Z/>"])


@st.composite
def commands(draw: st.DrawFn) -> str:
    """The usual shape (in its variants) half of the time, else with one thing changed."""
    odd = draw(st.sampled_from([None, None, None, "meta", "item", "target", "loc", "command",
                                "cmdid", "no target", "order"]))
    target = [f"<LocURI>{draw(TEXT)}</LocURI>"]
    if odd == "target":
        target.insert(draw(st.integers(0, 1)), draw(ODD_TARGET))
    if odd == "loc":
        target = ["<LocURI>a<b/></LocURI>"]
    parts = [] if odd == "no target" else [f"<Target>{''.join(target)}</Target>"]
    if draw(st.booleans()) or odd == "meta":
        meta = draw(st.lists(CLEAN_META, max_size=2, unique_by=lambda m: m[1:5]))
        if odd == "meta":
            meta.insert(draw(st.integers(0, len(meta))), draw(ODD_META))
        parts.append(f"<Meta>{''.join(meta)}</Meta>")
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from([f"<Data>{draw(TEXT)}</Data>", "<Data/>"])))
    if odd == "item":
        parts.append(draw(ODD_ITEM))
    item = f"<Item>{''.join(draw(st.permutations(parts)))}</Item>"
    cmd_id = "<CmdID>1<y/></CmdID>" if odd == "cmdid" else f"<CmdID>{draw(TEXT)}</CmdID>"
    children = [cmd_id, item]
    if odd == "command":
        children.insert(draw(st.integers(0, 2)), draw(ODD_COMMAND))
    if odd == "order":
        children.reverse()
    kind = draw(st.sampled_from(["Get", "Replace", "Add", "Delete", "Exec", "Copy"]))
    ns = draw(st.sampled_from(["", "", "", ' xmlns="SYNCML:SYNCML1.2"', ' xmlns=""']))
    return f"<{kind}{ns}>{''.join(children)}</{kind}>"


def outcome(data: bytes, unqualified: bool, simple: bool) -> tuple[str, object]:
    original = _decode._Decoder.simple_command
    if not simple:
        _decode._Decoder.simple_command = lambda self, kind, el: None  # type: ignore[method-assign]
    try:
        return "message", _decode.decode(data, codec.DEFAULT_MAX_BYTES, 16,
                                         unqualified=unqualified)
    except _decode.DecodeFailure as exc:
        return "error", str(exc)
    finally:
        _decode._Decoder.simple_command = original  # type: ignore[method-assign]


def document(body: list[str]) -> bytes:
    return (f'<SyncML xmlns="SYNCML:SYNCML1.2">{HEADER}<SyncBody>{"".join(body)}'
            "</SyncBody></SyncML>").encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(commands(), min_size=1, max_size=4), st.booleans())
def test_short_path_decodes_as_the_general_walk(body: list[str], unqualified: bool) -> None:
    data = document(body)
    assert outcome(data, unqualified, True) == outcome(data, unqualified, False)


def usual() -> Iterator[str]:
    yield "<Get><CmdID>1</CmdID><Item><Target><LocURI>./DevInfo/Man</LocURI></Target></Item></Get>"
    yield ('<Replace><CmdID> r1 </CmdID><Item><Data>10.0.1</Data><Meta><Type xmlns='
           '"syncml:metinf">text/plain</Type><Format xmlns="syncml:metinf">chr</Format></Meta>'
           "<Target><LocURI> ./a </LocURI></Target></Item></Replace>")
    yield "<Exec><CmdID>2</CmdID><Item><Target><LocURI>./e</LocURI></Target><Data/></Item></Exec>"


@pytest.mark.parametrize("unqualified", [True, False])
def test_the_usual_shapes_take_the_short_path(unqualified: bool) -> None:
    taken: list[object] = []
    original = _decode._Decoder.simple_command

    def spy(self: _decode._Decoder, kind: object, el: object) -> ItemCommand | None:
        result = original(self, kind, el)  # type: ignore[arg-type]
        taken.append(result)
        return result

    _decode._Decoder.simple_command = spy  # type: ignore[method-assign]
    try:
        message = _decode.decode(document(list(usual())), codec.DEFAULT_MAX_BYTES, 16,
                                 unqualified=unqualified)
    finally:
        _decode._Decoder.simple_command = original  # type: ignore[method-assign]
    assert len(taken) == 3 and all(taken)
    assert list(message.body) == taken
    replace = message.body[1]
    assert isinstance(replace, ItemCommand)
    (item,) = replace.items
    assert (replace.cmd_id, item.target, item.data) == ("r1", "./a", "10.0.1")
    assert item.meta is not None and (item.meta.format, item.meta.type) == ("chr", "text/plain")


def test_the_one_item_builder_makes_what_the_constructors_make() -> None:
    import dataclasses
    import pickle

    from agent.syncml import _build
    from agent.syncml.messages import Cmd, Item, Meta

    meta = Meta(format="chr")
    for built, constructed in [
        (_build.one_item_command(Cmd.REPLACE, "r1", "./a", meta, "1"),
         ItemCommand(Cmd.REPLACE, "r1", (Item(target="./a", meta=meta, data="1"),))),
        (_build.one_item_command(Cmd.GET, "", "./b", None, None),
         ItemCommand(Cmd.GET, "", (Item(target="./b"),))),
    ]:
        assert built == constructed and hash(built) == hash(constructed)
        assert repr(built) == repr(constructed) and vars(built) == vars(constructed)
        assert vars(built.items[0]) == vars(constructed.items[0])
        assert pickle.loads(pickle.dumps(built)) == constructed
        assert dataclasses.replace(built) == constructed
