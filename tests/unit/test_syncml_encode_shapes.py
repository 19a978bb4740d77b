"""The encoder's one-string fast paths (Status, Results, Item, Meta) write exactly what the
element-by-element rules write, for any field values: checked against a reference copy of the
general encoder, including text that needs escaping and characters XML cannot carry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.syncml import codec
from agent.syncml._text import escape
from agent.syncml.messages import METINF_NS, Chal, Item, Meta, Results, Status

# --- the reference: the general rules, one element at a time -------------------------------


def ref_cmd_id(cmd_id: str | None) -> str:
    return "" if cmd_id is None else f"<CmdID>{escape(cmd_id)}</CmdID>"


def ref_loc(tag: str, uri: str, name: str | None = None) -> str:
    inner = f"<LocURI>{escape(uri)}</LocURI>"
    if name is not None:
        inner += f"<LocName>{escape(name)}</LocName>"
    return f"<{tag}>{inner}</{tag}>"


def ref_meta(m: Meta) -> str:
    out = ["<Meta>"]
    for tag, value in (("Format", m.format), ("Type", m.type), ("Size", m.size),
                       ("NextNonce", m.next_nonce), ("MaxMsgSize", m.max_msg_size),
                       ("MaxObjSize", m.max_obj_size)):
        if value is not None:
            out.append(f'<{tag} xmlns="{METINF_NS}">{escape(str(value))}</{tag}>')
    out.append("</Meta>")
    return "".join(out)


def ref_item(it: Item) -> str:
    out = ["<Item>"]
    if it.target is not None:
        out.append(ref_loc("Target", it.target))
    if it.source is not None or it.source_name is not None:
        out.append(ref_loc("Source", it.source or "", it.source_name))
    if it.meta is not None:
        out.append(ref_meta(it.meta))
    if it.data is not None:
        out += ["<Data>", it.data if it.data_is_xml else escape(it.data), "</Data>"]
    if it.more_data:
        out.append("<MoreData/>")
    out.append("</Item>")
    return "".join(out)


def ref_status(s: Status, cid: str | None) -> str:
    out = ["<Status>", ref_cmd_id(s.cmd_id if cid is None else cid), "<MsgRef>",
           escape(s.msg_ref), "</MsgRef><CmdRef>", escape(s.cmd_ref), "</CmdRef><Cmd>",
           escape(s.cmd), "</Cmd>"]
    out += [f"<TargetRef>{escape(t)}</TargetRef>" for t in s.target_refs]
    out += [f"<SourceRef>{escape(r)}</SourceRef>" for r in s.source_refs]
    if s.chal is not None:
        out.append(f"<Chal>{ref_meta(s.chal.meta)}</Chal>")
    out += ["<Data>", str(s.data), "</Data>"]
    out += [ref_item(it) for it in s.items]
    out.append("</Status>")
    return "".join(out)


def ref_results(r: Results, cid: str | None) -> str:
    out = ["<Results>", ref_cmd_id(r.cmd_id if cid is None else cid), "<MsgRef>",
           escape(r.msg_ref), "</MsgRef><CmdRef>", escape(r.cmd_ref), "</CmdRef><Cmd>Get</Cmd>"]
    if r.meta is not None:
        out.append(ref_meta(r.meta))
    if r.target_ref is not None:
        out.append(f"<TargetRef>{escape(r.target_ref)}</TargetRef>")
    if r.source_ref is not None:
        out.append(f"<SourceRef>{escape(r.source_ref)}</SourceRef>")
    out += [ref_item(it) for it in r.items]
    out.append("</Results>")
    return "".join(out)


# --- generated messages ------------------------------------------------------------------------

TEXT = st.one_of(st.sampled_from(["", "2", "Get", "./DevDetail/SwV", "a<b&c>d", "x\r\ny",
                                  "tab\there", "\x00\x1f", "ünï ✓"]), st.text(max_size=12))
OPT = st.none() | TEXT
METAS = st.builds(Meta, format=OPT, type=OPT, size=st.none() | st.integers(0, 10**9),
                  max_msg_size=st.none() | st.integers(0, 10**7),
                  max_obj_size=st.none() | st.integers(0, 10**7), next_nonce=OPT)
SIMPLE_METAS = st.builds(Meta, format=OPT, type=OPT)
ITEMS = st.builds(Item, target=OPT, source=OPT, source_name=OPT,
                  meta=st.none() | SIMPLE_METAS | METAS, data=OPT, more_data=st.booleans(),
                  data_is_xml=st.booleans())
RESULT_ITEMS = st.builds(Item, source=TEXT, meta=st.none() | SIMPLE_METAS, data=TEXT)
REFS = st.lists(TEXT, max_size=2).map(tuple)
STATUSES = st.builds(Status, cmd_id=TEXT, msg_ref=TEXT, cmd_ref=TEXT, cmd=TEXT,
                     data=st.integers(100, 599), target_refs=st.just(()) | REFS,
                     source_refs=st.just(()) | REFS,
                     chal=st.none() | st.builds(Chal, meta=METAS),
                     items=st.just(()) | st.lists(ITEMS, max_size=2).map(tuple))
RESULTS = st.builds(Results, cmd_id=TEXT, msg_ref=TEXT, cmd_ref=TEXT,
                    items=st.lists(st.one_of(RESULT_ITEMS, ITEMS), min_size=1,
                                   max_size=2).map(tuple),
                    meta=st.none() | METAS, target_ref=OPT, source_ref=OPT)
CMD_IDS = st.none() | st.integers(1, 999).map(str)


@settings(max_examples=300, deadline=None)
@given(STATUSES, CMD_IDS)
def test_status(status: Status, cid: str | None) -> None:
    assert codec.encode_command(status, cid) == ref_status(status, cid)


@settings(max_examples=300, deadline=None)
@given(RESULTS, CMD_IDS)
def test_results(results: Results, cid: str | None) -> None:
    assert codec.encode_command(results, cid) == ref_results(results, cid)


@settings(max_examples=300, deadline=None)
@given(st.one_of(RESULT_ITEMS, ITEMS))
def test_item_and_meta(item: Item) -> None:
    assert codec._item(item) == ref_item(item)
    if item.meta is not None:
        assert codec._meta(item.meta) == ref_meta(item.meta)
