"""The decoding half of `agent.syncml.codec` (use `codec.decode`, not this module).

Walks the lxml tree by local name: servers put the MetInf children in `syncml:metinf` (declared on
each element, as MS-MDM's examples do) or leave them in the SyncML namespace; both are read.
Element order inside a command is not enforced (servers differ), but structure is: an element
that must hold text and holds elements, a Status whose code is not a number, a size that is not
a non-negative decimal, a missing SyncHdr, SessionID or MsgID are all errors. Unknown elements
inside a command are skipped; unknown elements in SyncBody, Atomic and Sequence become
`UnknownCommand` (answered 400, MS-MDM "OMA DM protocol support").
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Final

from agent.syncml import _build

if TYPE_CHECKING:
    from lxml import etree
from agent.syncml._text import escape
from agent.syncml.messages import (
    CONTAINER_COMMANDS,
    ITEM_COMMANDS,
    METINF_NS,
    SYNCML_NS,
    Alert,
    Chal,
    Cmd,
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

_NS_PREFIX = "{" + SYNCML_NS + "}"
_MAX_INT_DIGITS = 12  # sizes and status codes; Python's int() would also take "1_0" and "١"


class DecodeFailure(Exception):
    """Internal: turned into SyncMLDecodeError by the codec."""


_ROOT_START = f'<SyncML xmlns="{SYNCML_NS}">'.encode()


def decode(data: bytes, max_bytes: int, max_nesting: int, *,
           unqualified: bool = True) -> SyncMLMessage:
    """`unqualified`: read the usual message the fast ways, with ElementTree (`_expat`) or
    with lxml after taking its root's default namespace declaration out (see
    `_decode_unqualified`); False decodes every message as sent, with lxml."""
    if not data:
        raise DecodeFailure("empty message")
    if len(data) > max_bytes:
        raise DecodeFailure(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if not data.isascii():  # ASCII is UTF-8: the check that matters is for the others
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeFailure(f"not UTF-8: invalid byte 0x{data[exc.start]:02X} at offset "
                                f"{exc.start}") from None
    root_at = _check_prolog(data)
    if unqualified:
        from agent.syncml._expat import decode_usual  # it imports this module

        message = decode_usual(data, root_at, max_nesting)
        if message is not None:
            return message
    if unqualified and root_at >= 0 and data.startswith(_ROOT_START, root_at):
        message = _decode_unqualified(data, root_at, max_nesting)
        if message is not None:
            return message
    return _parse(data, max_nesting, unqualified=False)


def _decode_unqualified(data: bytes, root_at: int, max_nesting: int) -> SyncMLMessage | None:
    """The message with `<SyncML xmlns="SYNCML:SYNCML1.2">` read as `<SyncML>`: the same
    document but for the namespace of the elements that inherit the default one, and the
    decoder reads element names without regard to namespace (`_NAMES` holds both forms), so
    the same message comes out; lxml just builds the element names faster (`{ns}name` is
    formatted on every `.tag`). Whatever this reading cannot vouch for gives None, and the
    caller decodes the bytes as sent: any failure (its message must name what the server
    sent: columns, lines) and Data with element children (serialized with namespaces).
    tests/unit/test_syncml_decode_unqualified.py holds both readings to the same results."""
    try:
        return _parse(b"".join((data[:root_at], b"<SyncML>",
                                data[root_at + len(_ROOT_START):])), max_nesting,
                      unqualified=True)
    except Exception:  # decoded again as sent, which reports it
        return None


def _parse(data: bytes, max_nesting: int, *, unqualified: bool) -> SyncMLMessage:
    # lxml is imported here, when a message needs it: a session whose messages all take the
    # ElementTree reading (_expat) never loads it (~25 ms and its memory per process).
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, remove_comments=True, remove_pis=True,
                             collect_ids=False, encoding="utf-8")
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise DecodeFailure(f"malformed XML: {exc}") from None
    if root.getroottree().docinfo.internalDTD is not None:  # _check_prolog should have caught it
        raise DecodeFailure("a DOCTYPE is not allowed")
    return _Decoder(max_nesting, unqualified).message(root)


class _Qualified(Exception):
    """Internal: the unqualified reading met something it cannot vouch for."""


def _check_prolog(data: bytes) -> int:
    """Refuse a DOCTYPE before parsing: it is the only way to declare entities (billion laughs,
    external entities), and SyncML never needs one. Only the prolog can hold it (XML 1.0 §2.8),
    so text inside Data that merely mentions <!DOCTYPE is not affected. Returns the offset
    of what follows the prolog (the root element in a well-formed message), -1 when the
    prolog does not end (the parser reports it)."""
    i = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    n = len(data)
    while i < n:
        while i < n and data[i] in b" \t\r\n":
            i += 1
        if data.startswith(b"<?", i):
            end = data.find(b"?>", i + 2)
            if end < 0:
                return -1  # the parser reports the unterminated declaration
            i = end + 2
        elif data.startswith(b"<!--", i):
            end = data.find(b"-->", i + 4)
            if end < 0:
                return -1
            i = end + 3
        elif data.startswith(b"<!", i):
            what = "a DOCTYPE" if data.startswith(b"<!DOCTYPE", i) else "a markup declaration"
            raise DecodeFailure(f"{what} is not allowed (offset {i}); SyncML messages carry "
                                "no DTD and entity declarations are refused")
        else:
            return i
    return -1


def _local(tag: object) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


# Local names of the elements the decoder reads, by qualified tag (the decoder walks a few
# hundred elements per message: a dict lookup is cheaper than splitting every tag).
_NAMES: dict[object, str] = {
    f"{{{ns}}}{name}" if ns else name: name
    for ns in (SYNCML_NS, METINF_NS, "")
    for name in ("SyncHdr", "SyncBody", "Final", "VerDTD", "VerProto", "SessionID", "MsgID",
                 "Target", "Source", "RespURI", "NoResp", "Cred", "Meta", "LocURI", "LocName",
                 "CmdID", "Item", "Data", "MoreData", "MsgRef", "CmdRef", "Cmd", "TargetRef",
                 "SourceRef", "Chal", "Format", "Type", "Size", "MaxMsgSize", "MaxObjSize",
                 "NextNonce", "MetInf", "Add", "Replace", "Delete", "Get", "Exec", "Copy",
                 "Atomic", "Sequence", "Alert", "Status", "Results")
}
_COMMANDS: dict[str, Cmd] = {c.value: c for c in Cmd}
_ITEM_KINDS: dict[str, Cmd] = {c.value: c for c in ITEM_COMMANDS}
# The item commands by qualified tag: one lookup for the usual SyncBody child.
_ITEM_TAGS: dict[object, Cmd] = {tag: _ITEM_KINDS[name] for tag, name in _NAMES.items()
                                 if name in _ITEM_KINDS}


_Tags = tuple[str, str, str, str, str, str, tuple[str, str], tuple[str, str]]


def _tags(ns: str) -> _Tags:
    """The element names `_Decoder.simple_command` compares, as the parser spells them in one
    reading: qualified (`{SYNCML:SYNCML1.2}CmdID`) or unqualified (`CmdID`): CmdID, Item,
    Target, LocURI, Meta, Data, then Format and Type, which may be in either namespace."""
    return (f"{ns}CmdID", f"{ns}Item", f"{ns}Target", f"{ns}LocURI", f"{ns}Meta", f"{ns}Data",
            (f"{{{METINF_NS}}}Format", f"{ns}Format"), (f"{{{METINF_NS}}}Type", f"{ns}Type"))


_QUALIFIED_TAGS: Final = _tags(_NS_PREFIX)
_UNQUALIFIED_TAGS: Final = _tags("")


def _not_text(el: etree._Element, what: str) -> DecodeFailure:
    return DecodeFailure(f"<{what}> must hold text, found element <{_local(el[0].tag)}> "
                         f"(line {el.sourceline})")


def _text(el: etree._Element, what: str) -> str:
    if len(el):
        raise _not_text(el, what)
    return el.text or ""


def _int(el: etree._Element, what: str) -> int:
    text = _text(el, what).strip()
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_INT_DIGITS):
        raise DecodeFailure(f"<{what}> must be a non-negative decimal number, got {text[:40]!r} "
                            f"(line {el.sourceline})")
    return int(text)


def _inner_xml(el: etree._Element) -> str:
    """Data with child elements: its content serialized, minus the SyncML default namespace
    the children inherit when the server did not declare one of their own (MS-MDM §2.2.5.1)."""
    from lxml import etree

    parts = [escape(el.text or "")]
    # Comments and PIs were removed by the parser and entities cannot be declared, so every
    # child is an element.
    for child in el:
        clone = copy.deepcopy(child)
        for sub in clone.iter():
            if isinstance(sub.tag, str) and sub.tag.startswith(_NS_PREFIX):
                sub.tag = sub.tag[len(_NS_PREFIX):]
        etree.cleanup_namespaces(clone)
        parts.append(etree.tostring(clone, encoding="unicode", with_tail=True))
    return "".join(parts)


class _Decoder:
    def __init__(self, max_nesting: int, unqualified: bool = False) -> None:
        self.max_nesting = max_nesting
        self.unqualified = unqualified  # the root's namespace declaration was taken out
        self.tags = _UNQUALIFIED_TAGS if unqualified else _QUALIFIED_TAGS
        # Meta objects with only Format/Type, shared within the message (Meta is immutable;
        # a message's items carry the same few, e.g. <Format>chr</Format>)
        self._metas: dict[tuple[str | None, str | None], Meta] = {}

    def message(self, root: etree._Element) -> SyncMLMessage:
        if root.tag != _NS_PREFIX + "SyncML" and not (self.unqualified and
                                                      root.tag == "SyncML"):
            local = _local(root.tag)
            if local == "SyncML":
                ns = root.tag[1:].partition("}")[0] if root.tag.startswith("{") else "(none)"
                raise DecodeFailure(f"<SyncML> must be in namespace {SYNCML_NS}, found {ns}")
            raise DecodeFailure(f"not a SyncML message: the root element is <{local}>")
        header_el = body_el = None
        for child in root:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local == "SyncHdr":
                if header_el is not None:
                    raise DecodeFailure("more than one <SyncHdr>")
                header_el = child
            elif local == "SyncBody":
                if body_el is not None:
                    raise DecodeFailure("more than one <SyncBody>")
                body_el = child
        if header_el is None:
            raise DecodeFailure("<SyncHdr> is missing")
        header = self.header(header_el)
        if body_el is None:  # MS-MDM §3: a message MAY omit SyncBody
            return SyncMLMessage(header, (), final=False)
        body: list[Command] = []
        final = False
        names = _NAMES
        item_tags = _ITEM_TAGS
        item_command = self.item_command
        simple = self.simple_command
        for child in body_el:
            tag = child.tag
            kind = item_tags.get(tag)
            if kind is not None:  # the usual child, dispatched by its qualified tag
                body.append(simple(kind, child) or item_command(kind, child))
                continue
            local = names.get(tag) or _local(tag)
            kind = _ITEM_KINDS.get(local)
            if kind is not None:  # the common case, dispatched here rather than in command()
                body.append(self.item_command(kind, child))
            elif local == "Final":
                final = True
            else:
                body.append(self.command(local, child, 0))
        return SyncMLMessage(header, tuple(body), final)

    def header(self, el: etree._Element) -> SyncHdr:
        values: dict[str, str] = {}
        target = source = None
        target_name = source_name = resp_uri = None
        cred = meta = None
        no_resp = False
        for child in el:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local in ("VerDTD", "VerProto", "SessionID", "MsgID"):
                values.setdefault(local, _text(child, local).strip())
            elif local == "Target" and target is None:
                target, target_name = self.loc(child, "Target")
            elif local == "Source" and source is None:
                source, source_name = self.loc(child, "Source")
            elif local == "RespURI":
                resp_uri = _text(child, local).strip()
            elif local == "NoResp":
                no_resp = True
            elif local == "Cred":
                cred = self.cred(child)
            elif local == "Meta":
                meta = self.meta(child)
        for required in ("SessionID", "MsgID"):
            if not values.get(required):
                raise DecodeFailure(f"<SyncHdr> has no <{required}>")
        if target is None or source is None:
            missing = "Target" if target is None else "Source"
            raise DecodeFailure(f"<SyncHdr> has no <{missing}><LocURI>")
        return SyncHdr(session_id=values["SessionID"], msg_id=values["MsgID"], target=target,
                       source=source, source_name=source_name, target_name=target_name,
                       cred=cred, meta=meta, resp_uri=resp_uri, no_resp=no_resp,
                       ver_dtd=values.get("VerDTD", ""), ver_proto=values.get("VerProto", ""))

    @staticmethod
    def loc(el: etree._Element, what: str) -> tuple[str | None, str | None]:
        uri = name = None
        names = _NAMES
        for child in el:
            tag = child.tag
            local = names.get(tag) or _local(tag)
            if local == "LocURI":
                if uri is None:
                    if len(child):
                        raise _not_text(child, f"{what}/LocURI")
                    uri = (child.text or "").strip()  # servers indent LocURIs
            elif local == "LocName" and name is None:
                name = _text(child, f"{what}/LocName")
        return uri, name

    def meta(self, el: etree._Element) -> Meta:
        fmt = typ = nonce = None
        size = max_msg = max_obj = None
        names = _NAMES
        for child in el:
            tag = child.tag
            local = names.get(tag) or _local(tag)
            if local == "Format":
                fmt = _text(child, "Meta/Format").strip()
            elif local == "Type":
                typ = _text(child, "Meta/Type").strip()
            elif local == "Size":
                size = _int(child, "Meta/Size")
            elif local == "MaxMsgSize":
                max_msg = _int(child, "Meta/MaxMsgSize")
            elif local == "MaxObjSize":
                max_obj = _int(child, "Meta/MaxObjSize")
            elif local == "NextNonce":
                nonce = _text(child, "Meta/NextNonce").strip()
            elif local == "MetInf":  # SyncML allows the MetInf children wrapped in <MetInf>
                inner = self.meta(child)
                fmt, typ, size = fmt or inner.format, typ or inner.type, size or inner.size
                nonce = nonce or inner.next_nonce
                max_msg, max_obj = max_msg or inner.max_msg_size, max_obj or inner.max_obj_size
        if size is None and max_msg is None and max_obj is None and nonce is None:
            return self._shared_meta(fmt, typ)
        return _build.meta(fmt, typ, size, max_msg, max_obj, nonce)

    def cred(self, el: etree._Element) -> Cred:
        meta = Meta()
        data = ""
        for child in el:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local == "Meta":
                meta = self.meta(child)
            elif local == "Data":
                data = _text(child, "Cred/Data").strip()
        return Cred(meta, data)

    def item(self, el: etree._Element) -> Item:
        target = source = source_name = data = None
        meta = None
        more = is_xml = False
        names = _NAMES
        for child in el:
            tag = child.tag
            local = names.get(tag) or _local(tag)
            if local == "Target":
                target = self.loc(child, "Item/Target")[0]
            elif local == "Data":
                if len(child):
                    if self.unqualified:  # serialized with the namespaces as sent
                        raise _Qualified
                    data, is_xml = _inner_xml(child), True
                else:
                    data = child.text or ""
            elif local == "Meta":
                meta = self.meta(child)
            elif local == "Source":
                source, source_name = self.loc(child, "Item/Source")
            elif local == "MoreData":
                more = True
        # _build: the frozen dataclass without its __init__'s cost (a few hundred per message)
        return _build.item(target, source, meta, data, source_name, more, is_xml)

    def command(self, local: str, el: etree._Element, depth: int) -> Command:
        if local in ITEM_COMMANDS:
            return self.item_command(_COMMANDS[local], el)
        if local in CONTAINER_COMMANDS:
            return self.container(_COMMANDS[local], el, depth)
        if local == "Alert":
            return self.alert(el)
        if local == "Status":
            return self.status(el)
        if local == "Results":
            return self.results(el)
        return UnknownCommand(local, self.cmd_id(el))

    @staticmethod
    def cmd_id(el: etree._Element) -> str | None:
        for child in el:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local == "CmdID":
                return _text(child, "CmdID").strip()  # opaque text: servers send UUIDs
        return None

    def simple_command(self, kind: Cmd, el: etree._Element) -> ItemCommand | None:
        """The shape nearly every server command has, read without the general walk:
        `<CmdID>` then one `<Item>` holding one `<Target><LocURI>`, at most one `<Meta>` (only
        `<Format>`/`<Type>`, each at most once) and at most one `<Data>`, every text element
        without children. The same ItemCommand `item_command` builds from it; None for
        anything else (not consumed: `item_command` reads it then, errors included).
        tests/unit/test_syncml_decode_simple.py holds both to the same results."""
        if len(el) != 2:
            return None
        cmd_el, item_el = el
        t_cmd_id, t_item, t_target, t_loc_uri, t_meta, t_data, t_format, t_type = self.tags
        if cmd_el.tag != t_cmd_id or item_el.tag != t_item or len(cmd_el):
            return None
        target = meta = data = None
        for child in item_el:
            tag = child.tag
            if tag == t_target:
                if target is not None or len(child) != 1:
                    return None
                loc = child[0]
                if loc.tag != t_loc_uri or len(loc):
                    return None
                target = (loc.text or "").strip()
            elif tag == t_data:
                if data is not None or len(child):
                    return None
                data = child.text or ""
            elif tag == t_meta:
                if meta is not None:
                    return None
                fmt = typ = None
                for sub in child:
                    if len(sub):
                        return None
                    if sub.tag in t_format and fmt is None:
                        fmt = (sub.text or "").strip()
                    elif sub.tag in t_type and typ is None:
                        typ = (sub.text or "").strip()
                    else:
                        return None
                meta = self._shared_meta(fmt, typ)
            else:
                return None
        if target is None:
            return None
        return _build.one_item_command(kind, (cmd_el.text or "").strip(), target, meta, data)

    def _shared_meta(self, fmt: str | None, typ: str | None) -> Meta:
        key = (fmt, typ)
        meta = self._metas.get(key)
        if meta is None:
            meta = self._metas[key] = _build.meta(fmt, typ)
        return meta

    def item_command(self, kind: Cmd, el: etree._Element) -> ItemCommand:
        cmd_id = None
        items: list[Item] = []
        meta = cred = None
        no_resp = False
        names = _NAMES
        item = self.item
        for child in el:
            tag = child.tag
            local = names.get(tag) or _local(tag)
            if local == "Item":
                items.append(item(child))
            elif local == "CmdID":
                if cmd_id is None:
                    if len(child):
                        raise _not_text(child, "CmdID")
                    cmd_id = (child.text or "").strip()
            elif local == "Meta":
                meta = self.meta(child)
            elif local == "NoResp":
                no_resp = True
            elif local == "Cred":
                cred = self.cred(child)
        return _build.item_command(kind, cmd_id, tuple(items), meta, no_resp, cred)

    def container(self, kind: Cmd, el: etree._Element, depth: int) -> Container:
        if depth >= self.max_nesting:
            raise DecodeFailure(f"<{kind.value}> nested deeper than {self.max_nesting} levels "
                                f"(line {el.sourceline})")
        cmd_id = None
        meta = None
        no_resp = False
        commands: list[Command] = []
        for child in el:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local == "CmdID" and cmd_id is None:
                cmd_id = _text(child, "CmdID").strip()
            elif local == "Meta":
                meta = self.meta(child)
            elif local == "NoResp":
                no_resp = True
            else:
                commands.append(self.command(local, child, depth + 1))
        return Container(kind, cmd_id, tuple(commands), meta, no_resp)

    def alert(self, el: etree._Element) -> Alert:
        cmd_id = None
        data = ""
        items: list[Item] = []
        no_resp = False
        for child in el:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local == "CmdID" and cmd_id is None:
                cmd_id = _text(child, "CmdID").strip()
            elif local == "Data":
                data = _text(child, "Alert/Data").strip()
            elif local == "Item":
                items.append(self.item(child))
            elif local == "NoResp":
                no_resp = True
        return Alert(cmd_id, data, tuple(items), no_resp)

    def status(self, el: etree._Element) -> Status:
        values: dict[str, str] = {}
        code: int | None = None
        targets: list[str] = []
        sources: list[str] = []
        items: list[Item] = []
        chal = None
        for child in el:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local in ("CmdID", "MsgRef", "CmdRef", "Cmd"):
                values.setdefault(local, _text(child, f"Status/{local}").strip())
            elif local == "Data" and code is None:
                code = _int(child, "Status/Data")
            elif local == "TargetRef":
                targets.append(_text(child, "TargetRef").strip())
            elif local == "SourceRef":
                sources.append(_text(child, "SourceRef").strip())
            elif local == "Item":
                items.append(self.item(child))
            elif local == "Chal":
                meta = Meta()
                for sub in child:
                    if _local(sub.tag) == "Meta":
                        meta = self.meta(sub)
                chal = Chal(meta)
        if code is None:
            raise DecodeFailure(f"<Status> without a <Data> code (line {el.sourceline})")
        return Status(cmd_id=values.get("CmdID", ""), msg_ref=values.get("MsgRef", ""),
                      cmd_ref=values.get("CmdRef", ""), cmd=values.get("Cmd", ""), data=code,
                      target_refs=tuple(targets), source_refs=tuple(sources), chal=chal,
                      items=tuple(items))

    def results(self, el: etree._Element) -> Results:
        values: dict[str, str] = {}
        items: list[Item] = []
        meta = None
        for child in el:
            local = _NAMES.get(child.tag) or _local(child.tag)
            if local in ("CmdID", "MsgRef", "CmdRef", "TargetRef", "SourceRef"):
                values.setdefault(local, _text(child, f"Results/{local}").strip())
            elif local == "Meta":
                meta = self.meta(child)
            elif local == "Item":
                items.append(self.item(child))
        # MS-MDM §2.2.7.8: a Results without MsgRef refers to message 1.
        return Results(cmd_id=values.get("CmdID", ""), msg_ref=values.get("MsgRef", "1"),
                       cmd_ref=values.get("CmdRef", ""), items=tuple(items), meta=meta,
                       target_ref=values.get("TargetRef"), source_ref=values.get("SourceRef"))
