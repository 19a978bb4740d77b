"""SyncML 1.2 XML ⇄ `SyncMLMessage` (sans-IO): a hardened decoder and a byte-exact encoder.

Decoding treats every byte as hostile (the server is a peer, possibly a test rig or an attacker):
the size is checked before anything else, the bytes must be UTF-8, a DOCTYPE (and with it every
entity declaration: billion laughs, XXE) is refused before the parser sees the document, and
lxml runs with entity resolution, DTD loading and network access off and its huge-tree guard on
(libxml2 then refuses nesting deeper than 256). Every failure is one `SyncMLDecodeError` with a
precise message, raised in milliseconds.

Encoding produces what the Windows client sends (MS-MDM §4 examples): no XML declaration, no
whitespace between elements, `xmlns="SYNCML:SYNCML1.2"` on the root and `xmlns="syncml:metinf"`
on each Meta child. Element order follows the SyncML 1.2 DTD (OMA-TS-SyncML_RepPro §5/§6).
Strings are built directly rather than through an lxml tree: it is several times faster and
lets the session measure each command's encoded size exactly when it packs messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.diagnostics import HResult
from agent.errors import PeerError
from agent.syncml import _decode
from agent.syncml._text import INVALID_XML, escape
from agent.syncml.messages import (
    METINF_NS,
    SYNCML_NS,
    Alert,
    Chal,
    Command,
    Container,
    Cred,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    SyncHdr,
    SyncMLMessage,
    UnknownCommand,
)

__all__ = ["DEFAULT_LIMITS", "INVALID_XML", "MESSAGE_OVERHEAD", "DecodeLimits",
           "SyncMLDecodeError", "decode", "encode", "encode_command", "encode_header", "escape"]

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_NESTING = 16


class SyncMLDecodeError(PeerError):
    """The server's message is not a SyncML 1.2 document the client can read."""

    default_hresult = HResult.CFGMGR_E_XMLPARSEERROR

    def __init__(self, message: str, *, hresult: int | None = None, advice: str = "") -> None:
        super().__init__(f"invalid SyncML from the server: {message}", hresult=hresult,
                         advice=advice or "the server sent a malformed message; run with -vv "
                                          "to see it, then fix the server")


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_nesting: int = DEFAULT_MAX_NESTING  # Atomic/Sequence inside Atomic/Sequence


DEFAULT_LIMITS = DecodeLimits()


def decode(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> SyncMLMessage:
    """Parse one server message. Raises `SyncMLDecodeError` and nothing else on bad input."""
    try:
        return _decode.decode(bytes(data), limits.max_bytes, limits.max_nesting)
    except _decode.DecodeFailure as exc:
        raise SyncMLDecodeError(str(exc)) from None


# --- encoding -----------------------------------------------------------------------------

_ROOT_OPEN = f'<SyncML xmlns="{SYNCML_NS}">'
_BODY_OPEN = "<SyncBody>"
_FINAL = "<Final/>"
_CLOSE = "</SyncBody></SyncML>"
# Bytes a message adds around its header and commands (with Final): for message packing.
MESSAGE_OVERHEAD = len(_ROOT_OPEN) + len(_BODY_OPEN) + len(_FINAL) + len(_CLOSE)

def encode(message: SyncMLMessage, *, number_from: int | None = None) -> bytes:
    """The message as bytes. `number_from`: write CmdIDs number_from, number_from + 1, ...
    in body order instead of the commands' own (how the session numbers its replies without
    copying every command)."""
    parts = [_ROOT_OPEN, encode_header(message.header), _BODY_OPEN]
    if number_from is None:
        parts += [encode_command(cmd) for cmd in message.body]
    else:
        append = parts.append
        for n, cmd in enumerate(message.body, start=number_from):
            # encode_command's dispatch, with the two kinds a reply is made of first
            kind = type(cmd)
            if kind is Status:
                append(_status(cmd, str(n)))  # type: ignore[arg-type]
            elif kind is Results:
                append(_results(cmd, str(n)))  # type: ignore[arg-type]
            else:
                append(encode_command(cmd, str(n)))
    if message.final:
        parts.append(_FINAL)
    parts.append(_CLOSE)
    return "".join(parts).encode("utf-8")


def encode_header(h: SyncHdr) -> str:
    out = ["<SyncHdr><VerDTD>", escape(h.ver_dtd), "</VerDTD><VerProto>", escape(h.ver_proto),
           "</VerProto><SessionID>", escape(h.session_id), "</SessionID><MsgID>",
           escape(h.msg_id), "</MsgID>", _loc("Target", h.target, h.target_name),
           _loc("Source", h.source, h.source_name)]
    if h.resp_uri is not None:
        out += ["<RespURI>", escape(h.resp_uri), "</RespURI>"]
    if h.no_resp:
        out.append("<NoResp/>")
    if h.cred is not None:
        out.append(_cred(h.cred))
    if h.meta is not None:
        out.append(_meta(h.meta))
    out.append("</SyncHdr>")
    return "".join(out)


def encode_command(cmd: Command, cmd_id: str | None = None) -> str:
    """One SyncBody element; messages are the concatenation of these (see MESSAGE_OVERHEAD).
    `cmd_id` replaces the command's own CmdID when given."""
    if isinstance(cmd, Status):
        return _status(cmd, cmd_id)
    if isinstance(cmd, Results):
        return _results(cmd, cmd_id)
    if isinstance(cmd, ItemCommand):
        return _item_command(cmd, cmd_id)
    if isinstance(cmd, Alert):
        return _alert(cmd, cmd_id)
    if isinstance(cmd, Container):
        return _container(cmd, cmd_id)
    return _unknown(cmd, cmd_id)


def _cmd_id(cmd_id: str | None) -> str:
    return "" if cmd_id is None else f"<CmdID>{escape(cmd_id)}</CmdID>"


def _loc(tag: str, uri: str, name: str | None = None) -> str:
    inner = f"<LocURI>{escape(uri)}</LocURI>"
    if name is not None:
        inner += f"<LocName>{escape(name)}</LocName>"
    return f"<{tag}>{inner}</{tag}>"


def _metinf(tag: str, value: object) -> str:
    return f'<{tag} xmlns="{METINF_NS}">{escape(str(value))}</{tag}>'


_FORMAT_OPEN = f'<Format xmlns="{METINF_NS}">'
_TYPE_OPEN = f'<Type xmlns="{METINF_NS}">'


def _meta(m: Meta) -> str:
    # MetInf DTD order: Format, Type, Mark, Size, Anchor, Version, NextNonce, MaxMsgSize,
    # MaxObjSize (OMA-TS-SyncML_MetaInfo §5).
    if m.size is None and m.next_nonce is None and m.max_msg_size is None and \
            m.max_obj_size is None:  # what items carry: Format and/or Type only
        fmt = "" if m.format is None else f"{_FORMAT_OPEN}{escape(m.format)}</Format>"
        if m.type is None:
            return f"<Meta>{fmt}</Meta>"
        return f"<Meta>{fmt}{_TYPE_OPEN}{escape(m.type)}</Type></Meta>"
    out = ["<Meta>"]
    for tag, value in (("Format", m.format), ("Type", m.type), ("Size", m.size),
                       ("NextNonce", m.next_nonce), ("MaxMsgSize", m.max_msg_size),
                       ("MaxObjSize", m.max_obj_size)):
        if value is not None:
            out.append(_metinf(tag, value))
    out.append("</Meta>")
    return "".join(out)


def _cred(c: Cred) -> str:
    return f"<Cred>{_meta(c.meta)}<Data>{escape(c.data)}</Data></Cred>"


def _chal(c: Chal) -> str:
    return f"<Chal>{_meta(c.meta)}</Chal>"


def _item(it: Item) -> str:
    if it.target is None and it.source_name is None and not it.more_data and \
            it.source is not None and it.data is not None and not it.data_is_xml:
        # What Results carry: Source, (Meta,) Data.
        meta = "" if it.meta is None else _meta(it.meta)
        return (f"<Item><Source><LocURI>{escape(it.source)}</LocURI></Source>{meta}"
                f"<Data>{escape(it.data)}</Data></Item>")
    out = ["<Item>"]
    if it.target is not None:
        out.append(_loc("Target", it.target))
    if it.source is not None or it.source_name is not None:
        out.append(_loc("Source", it.source or "", it.source_name))
    if it.meta is not None:
        out.append(_meta(it.meta))
    if it.data is not None:
        # Markup Data (data_is_xml) came from a parsed document or a CSP that produced XML:
        # written as is, so the receiver sees elements, not escaped text.
        out += ["<Data>", it.data if it.data_is_xml else escape(it.data), "</Data>"]
    if it.more_data:
        out.append("<MoreData/>")
    out.append("</Item>")
    return "".join(out)


def _item_command(c: ItemCommand, cid: str | None) -> str:
    tag = c.kind.value
    out = [f"<{tag}>", _cmd_id(c.cmd_id if cid is None else cid)]
    if c.no_resp:
        out.append("<NoResp/>")
    if c.cred is not None:
        out.append(_cred(c.cred))
    if c.meta is not None:
        out.append(_meta(c.meta))
    out += [_item(it) for it in c.items]
    out.append(f"</{tag}>")
    return "".join(out)


def _alert(a: Alert, cid: str | None) -> str:
    out = ["<Alert>", _cmd_id(a.cmd_id if cid is None else cid)]
    if a.no_resp:
        out.append("<NoResp/>")
    out += ["<Data>", escape(a.data), "</Data>"]
    out += [_item(it) for it in a.items]
    out.append("</Alert>")
    return "".join(out)


def _container(c: Container, cid: str | None) -> str:
    tag = c.kind.value
    out = [f"<{tag}>", _cmd_id(c.cmd_id if cid is None else cid)]
    if c.no_resp:
        out.append("<NoResp/>")
    if c.meta is not None:
        out.append(_meta(c.meta))
    out += [encode_command(sub) for sub in c.commands]
    out.append(f"</{tag}>")
    return "".join(out)


def _unknown(u: UnknownCommand, cid: str | None) -> str:
    return f"<{u.name}>{_cmd_id(u.cmd_id if cid is None else cid)}</{u.name}>"


def _plain(text: str) -> bool:
    """Whether `escape` would return `text` as it is. True of a concatenation exactly when
    true of each part, so one check can stand for several fields."""
    return text.isprintable() and "&" not in text and "<" not in text and ">" not in text


def _status(s: Status, cid: str | None) -> str:
    if not (s.target_refs or s.source_refs or s.items) and s.chal is None:  # the usual one
        cmd_id = s.cmd_id if cid is None else cid
        if cmd_id is not None and _plain(f"{cmd_id}{s.msg_ref}{s.cmd_ref}{s.cmd}"):
            return (f"<Status><CmdID>{cmd_id}</CmdID><MsgRef>{s.msg_ref}</MsgRef><CmdRef>"
                    f"{s.cmd_ref}</CmdRef><Cmd>{s.cmd}</Cmd><Data>{s.data!s}</Data></Status>")
        return (f"<Status>{_cmd_id(cmd_id)}<MsgRef>"
                f"{escape(s.msg_ref)}</MsgRef><CmdRef>{escape(s.cmd_ref)}</CmdRef><Cmd>"
                f"{escape(s.cmd)}</Cmd><Data>{s.data!s}</Data></Status>")
    out = ["<Status>", _cmd_id(s.cmd_id if cid is None else cid), "<MsgRef>",
           escape(s.msg_ref), "</MsgRef><CmdRef>", escape(s.cmd_ref), "</CmdRef><Cmd>",
           escape(s.cmd), "</Cmd>"]
    out += [f"<TargetRef>{escape(t)}</TargetRef>" for t in s.target_refs]
    out += [f"<SourceRef>{escape(r)}</SourceRef>" for r in s.source_refs]
    if s.chal is not None:
        out.append(_chal(s.chal))
    out += ["<Data>", str(s.data), "</Data>"]
    out += [_item(it) for it in s.items]
    out.append("</Status>")
    return "".join(out)


def _results(r: Results, cid: str | None) -> str:
    # MS-MDM §2.2.7.8: Windows writes <Cmd>Get</Cmd> in Results (the SyncML DTD does not).
    if r.meta is None and r.target_ref is None and r.source_ref is None and \
            len(r.items) == 1:  # what a Get answers
        cmd_id = r.cmd_id if cid is None else cid
        it = r.items[0]
        m = it.meta
        if cmd_id is not None and it.target is None and it.source_name is None and \
                not it.more_data and it.source is not None and it.data is not None and \
                not it.data_is_xml and (m is None or (
                    m.size is None and m.next_nonce is None and m.max_msg_size is None and
                    m.max_obj_size is None and m.format is not None)):
            # _item's Results shape with a Format-only or Format+Type Meta (or none), and
            # nothing to escape anywhere: one string.
            if m is None:
                meta = fields = ""
            elif m.type is None:
                meta = f"<Meta>{_FORMAT_OPEN}{m.format}</Format></Meta>"
                fields = f"{m.format}"
            else:
                meta = f"<Meta>{_FORMAT_OPEN}{m.format}</Format>{_TYPE_OPEN}{m.type}</Type></Meta>"
                fields = f"{m.format}{m.type}"
            if _plain(f"{cmd_id}{r.msg_ref}{r.cmd_ref}{it.source}{it.data}{fields}"):
                return (f"<Results><CmdID>{cmd_id}</CmdID><MsgRef>{r.msg_ref}</MsgRef><CmdRef>"
                        f"{r.cmd_ref}</CmdRef><Cmd>Get</Cmd><Item><Source><LocURI>{it.source}"
                        f"</LocURI></Source>{meta}<Data>{it.data}</Data></Item></Results>")
        return (f"<Results>{_cmd_id(cmd_id)}<MsgRef>"
                f"{escape(r.msg_ref)}</MsgRef><CmdRef>{escape(r.cmd_ref)}</CmdRef>"
                f"<Cmd>Get</Cmd>{_item(it)}</Results>")
    out = ["<Results>", _cmd_id(r.cmd_id if cid is None else cid), "<MsgRef>",
           escape(r.msg_ref), "</MsgRef><CmdRef>", escape(r.cmd_ref), "</CmdRef><Cmd>Get</Cmd>"]
    if r.meta is not None:
        out.append(_meta(r.meta))
    if r.target_ref is not None:
        out.append(f"<TargetRef>{escape(r.target_ref)}</TargetRef>")
    if r.source_ref is not None:
        out.append(f"<SourceRef>{escape(r.source_ref)}</SourceRef>")
    out += [_item(it) for it in r.items]
    out.append("</Results>")
    return "".join(out)
