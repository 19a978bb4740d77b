"""The usual server message read with the C ElementTree parser (part of `agent.syncml._decode`).

Why: lxml builds a Python proxy object and formats a `{namespace}name` string each time the
decoder touches an element; ElementTree's C tree holds ready Python objects, so walking the
usual 50-command message costs about half (a quarter of the client's CPU per message went into
that walk). lxml stays the parser of record: this module only reads messages it can vouch for
and answers None for everything else, and the caller then decodes the bytes with lxml, which
decides every error and every other message.

What it takes (anything else: None):
- at most `MAX_BYTES`, with nothing before the root element but a BOM, an XML 1.0
  declaration of UTF-8 and whitespace (expat accepts declarations libxml2 refuses, e.g.
  version="2.0"; comments and processing instructions are left to lxml too);
- `<SyncML>` (SyncML namespace) holding exactly `<SyncHdr>` then `<SyncBody>`;
- a header of the known text elements, Target/Source with LocURI/LocName, Meta with the
  known MetInf leaves, NoResp (no Cred);
- a body of item commands in the usual shape (`_Decoder.simple_command`), Status elements
  of text elements only, and Final.

Why it gives what lxml gives: libxml2 refuses nothing this accepts — names stay under its
50,000-character limit (the size bound), nesting is at most five deep (the shapes), the prolog
is one both take, and at the character level the two parsers agree on what is well-formed
(tests/unit/test_syncml_decode_expat.py holds them to it, with the same decoding, over the
codec's vectors, hostile input and mutated messages); and the elements read are decoded by
the same `_Decoder` code, over the same names, text and children.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any, Final

from agent.syncml import _build
from agent.syncml._decode import _ITEM_TAGS, _MAX_INT_DIGITS, _Decoder
from agent.syncml.messages import METINF_NS, SYNCML_NS, Command, Status, SyncHdr, SyncMLMessage

MAX_BYTES: Final = 48 * 1024  # < 50,000: libxml2's name length limit cannot be reached

_S: Final = "{" + SYNCML_NS + "}"
_ROOT, _HEADER, _BODY, _STATUS, _FINAL, _META, _NO_RESP = (
    _S + name for name in ("SyncML", "SyncHdr", "SyncBody", "Status", "Final", "Meta", "NoResp"))
_HEADER_TEXT: Final = frozenset(_S + name for name in ("VerDTD", "VerProto", "SessionID",
                                                        "MsgID", "RespURI"))
_LOCATIONS: Final = frozenset((_S + "Target", _S + "Source"))
_LOCATION_TEXT: Final = frozenset((_S + "LocURI", _S + "LocName"))
_META_TEXT: Final = frozenset(f"{{{ns}}}{name}" for ns in (METINF_NS, SYNCML_NS)
                              for name in ("Format", "Type", "Size", "MaxMsgSize",
                                           "MaxObjSize", "NextNonce"))
_STATUS_TEXT: Final = frozenset(_S + name for name in ("CmdID", "MsgRef", "CmdRef", "Cmd",
                                                        "Data", "TargetRef", "SourceRef"))


# What may come before the root: a UTF-8 byte order mark, an XML 1.0 declaration naming UTF-8
# (or no encoding) and whitespace. Anything else (a comment, a processing instruction, another
# version: expat takes version="2.0", libxml2 refuses it) is left to lxml.
_USUAL_PROLOG: Final = re.compile(
    rb"(?:\xef\xbb\xbf)?(?:<\?xml[ \t\r\n]+version[ \t\r\n]*=[ \t\r\n]*(['\"])1\.0\1"
    rb"(?:[ \t\r\n]+encoding[ \t\r\n]*=[ \t\r\n]*(['\"])(?i:utf-8)\2)?"
    rb"(?:[ \t\r\n]+standalone[ \t\r\n]*=[ \t\r\n]*(['\"])(?:yes|no)\3)?[ \t\r\n]*\?>)?"
    rb"[ \t\r\n]*")


def decode_usual(data: bytes, root_at: int, max_nesting: int) -> SyncMLMessage | None:
    """The message, or None when lxml must read it (see the module docstring). `data` has
    passed `_decode.decode`'s checks (size, UTF-8, no DOCTYPE); its root element starts at
    `root_at` (`_decode._check_prolog`)."""
    if len(data) > MAX_BYTES or root_at < 0 or \
            (root_at and not _USUAL_PROLOG.fullmatch(data, 0, root_at)):
        return None
    try:
        # (S314: no DTD can reach expat: only the usual prolog precedes the root, and a
        # DOCTYPE is only legal there, so no entity can be declared; size bounded.)
        parser = ET.XMLParser(encoding="utf-8")  # noqa: S314
        parser.feed(data)
        root = parser.close()
        return _read(root, max_nesting)
    except Exception:  # malformed, or a shape the decoder raises on: lxml reports it
        return None


def _read(root: Any, max_nesting: int) -> SyncMLMessage | None:
    if root.tag != _ROOT or len(root) != 2:
        return None
    header_el, body_el = root
    if header_el.tag != _HEADER or body_el.tag != _BODY or not _usual_header(header_el):
        return None
    decoder = _Decoder(max_nesting)
    header = _usual_header_fields(header_el) or decoder.header(header_el)
    body: list[Command] = []
    final = False
    for child in body_el:
        tag = child.tag
        kind = _ITEM_TAGS.get(tag)
        if kind is not None:
            command = decoder.simple_command(kind, child)
            if command is None:
                return None
            body.append(command)
        elif tag == _STATUS and _leaves(child, _STATUS_TEXT):
            body.append(_usual_status(child) or decoder.status(child))
        elif tag == _FINAL and not len(child):
            final = True
        else:
            return None
    return SyncMLMessage(header, tuple(body), final)


def _usual_header(el: Any) -> bool:
    for child in el:
        tag = child.tag
        if tag in _HEADER_TEXT or tag == _NO_RESP:
            if len(child):
                return False
        elif tag in _LOCATIONS:
            if not _leaves(child, _LOCATION_TEXT):
                return False
        elif tag == _META:
            if not _leaves(child, _META_TEXT):
                return False
        else:
            return False
    return True


_USUAL_HEADER: Final = tuple(_S + name for name in ("VerDTD", "VerProto", "SessionID", "MsgID",
                                                  "Target", "Source"))
_LOC_URI: Final = _S + "LocURI"
_USUAL_STATUS: Final = tuple(_S + name for name in ("CmdID", "MsgRef", "CmdRef", "Cmd", "Data"))


def _usual_header_fields(el: Any) -> SyncHdr | None:
    """The header every server sends (VerDTD, VerProto, SessionID, MsgID, Target, Source
    with one LocURI each, in that order), read directly: what `_Decoder.header` builds from
    it; None for anything else, which that general walk reads."""
    if len(el) != 6:
        return None
    ver_dtd, ver_proto, session, msg_id, target, source = el
    if (ver_dtd.tag, ver_proto.tag, session.tag, msg_id.tag, target.tag, source.tag) != \
            _USUAL_HEADER or len(target) != 1 or len(source) != 1:
        return None
    target_uri, source_uri = target[0], source[0]
    if target_uri.tag != _LOC_URI or source_uri.tag != _LOC_URI:
        return None
    session_id = (session.text or "").strip()
    msg = (msg_id.text or "").strip()
    if not session_id or not msg:  # the general walk raises the error (lxml reports it)
        return None
    return SyncHdr(session_id=session_id, msg_id=msg, target=(target_uri.text or "").strip(),
                   source=(source_uri.text or "").strip(),
                   ver_dtd=(ver_dtd.text or "").strip(), ver_proto=(ver_proto.text or "").strip())


def _usual_status(el: Any) -> Status | None:
    """A Status of CmdID, MsgRef, CmdRef, Cmd and a decimal Data, in that order (children
    already checked to be text elements): what `_Decoder.status` builds; None otherwise."""
    if len(el) != 5:
        return None
    cmd_id, msg_ref, cmd_ref, cmd, data = el
    if (cmd_id.tag, msg_ref.tag, cmd_ref.tag, cmd.tag, data.tag) != _USUAL_STATUS:
        return None
    code = (data.text or "").strip()
    if not (code.isascii() and code.isdigit() and len(code) <= _MAX_INT_DIGITS):
        return None
    return _build.status((msg_ref.text or "").strip(), (cmd_ref.text or "").strip(),
                         (cmd.text or "").strip(), int(code), (), (cmd_id.text or "").strip())


def _leaves(el: Any, allowed: frozenset[str]) -> bool:
    """Every child is an allowed element without children of its own."""
    return all(child.tag in allowed and not len(child) for child in el)
