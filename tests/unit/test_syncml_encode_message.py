"""`codec.encode(message, number_from=n)` (how the session writes every reply) writes each
command exactly as `encode_command(cmd, str(k))` and the reference rules of
test_syncml_encode_shapes write it: its loop dispatches Status and Results itself, and their
one-string fast paths skip escaping when a single check covers every field."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.syncml import codec
from agent.syncml.messages import (
    Alert,
    Cmd,
    Container,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    SyncHdr,
    SyncMLMessage,
)
from tests.unit.test_syncml_encode_shapes import (
    RESULTS,
    STATUSES,
    TEXT,
    ref_results,
    ref_status,
)

OTHERS = st.one_of(
    st.builds(Alert, cmd_id=TEXT, data=st.sampled_from(["1222", "1226"])),
    st.builds(ItemCommand, kind=st.sampled_from([Cmd.REPLACE, Cmd.GET]), cmd_id=TEXT,
              items=st.just((Item(source="./DevInfo/Man", meta=Meta(format="chr"),
                                  data="Contoso"),))),
    st.builds(Container, kind=st.just(Cmd.SEQUENCE), cmd_id=TEXT, commands=st.just(())),
)
# Result shapes the fast path takes and the ones next to it (Type without Format, Size, ...)
GET_RESULTS = st.builds(
    Results, cmd_id=TEXT, msg_ref=TEXT, cmd_ref=TEXT,
    items=st.builds(Item, source=TEXT, data=TEXT, meta=st.none() | st.builds(
        Meta, format=st.none() | TEXT, type=st.none() | TEXT,
        size=st.none() | st.just(5))).map(lambda i: (i,)))
BODIES = st.lists(st.one_of(STATUSES, RESULTS, GET_RESULTS, OTHERS), max_size=8)


def reference(cmd: object, cid: str) -> str:
    if isinstance(cmd, Status):
        return ref_status(cmd, cid)
    if isinstance(cmd, Results):
        return ref_results(cmd, cid)
    return codec.encode_command(cmd, cid)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(BODIES, st.integers(1, 3), st.booleans())
def test_a_numbered_message_is_its_commands_encoded_one_by_one(
        body: list[object], first: int, final: bool) -> None:
    header = SyncHdr("1", "2", "https://mdm.example.test/x", "dev")
    message = SyncMLMessage(header, tuple(body), final)  # type: ignore[arg-type]
    expected = "".join(['<SyncML xmlns="SYNCML:SYNCML1.2">', codec.encode_header(header),
                        "<SyncBody>", *(reference(c, str(n))
                                        for n, c in enumerate(body, start=first)),
                        "<Final/>" if final else "", "</SyncBody></SyncML>"])
    assert codec.encode(message, number_from=first) == expected.encode()


def test_plain_text_takes_the_fast_path_and_escaped_text_does_not() -> None:
    plain = Results("", "2", "abc", (Item(source="./DevInfo/Man", meta=Meta(format="chr"),
                                          data="Contoso"),))
    assert codec.encode_command(plain, "7") == (
        '<Results><CmdID>7</CmdID><MsgRef>2</MsgRef><CmdRef>abc</CmdRef><Cmd>Get</Cmd>'
        '<Item><Source><LocURI>./DevInfo/Man</LocURI></Source><Meta><Format '
        'xmlns="syncml:metinf">chr</Format></Meta><Data>Contoso</Data></Item></Results>')
    for text in ("a<b", "a&b", "a>b", "a\rb", "a\x01b"):
        status = Status("", "2", text, "Get", 200)
        assert codec.encode_command(status, "3") == ref_status(status, "3")
        res = Results("", "2", "r", (Item(source="./x", meta=Meta(format="chr"), data=text),))
        assert codec.encode_command(res, "4") == ref_results(res, "4")
