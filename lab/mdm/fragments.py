"""Raw SyncML command fragments ⇄ the agent's message objects (through its codec, not a fork).

The command queue stores commands as XML fragments (`<Get><CmdID>1</CmdID><Item>…</Item></Get>`,
several allowed, or a whole `<SyncML>` document whose SyncBody commands are taken). The server
re-numbers CmdIDs when it sends them (UUIDs like Intune, or per-session counters).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from agent.errors import DmAgentError
from agent.syncml import codec
from agent.syncml.messages import (
    Alert,
    Command,
    Container,
    ItemCommand,
    Results,
    Status,
    UnknownCommand,
)

_WRAP_HEAD = ('<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD>'
              "<VerProto>DM/1.2</VerProto><SessionID>0</SessionID><MsgID>0</MsgID>"
              "<Target><LocURI>device</LocURI></Target><Source><LocURI>lab</LocURI></Source>"
              "</SyncHdr><SyncBody>")
_WRAP_TAIL = "</SyncBody></SyncML>"
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>", re.S)


class FragmentError(ValueError):
    pass


def parse_fragment(xml: str) -> tuple[Command, ...]:
    """The commands of a fragment (or of a whole SyncML document's body)."""
    text = _XML_DECL.sub("", xml).strip()
    if not text:
        raise FragmentError("no SyncML commands given")
    doc = text if text.startswith("<SyncML") else _WRAP_HEAD + text + _WRAP_TAIL
    try:
        msg = codec.decode(doc.encode("utf-8"))
    except DmAgentError as exc:
        raise FragmentError(exc.message.replace("from the server", "in the command")) from None
    cmds = tuple(c for c in msg.body if not isinstance(c, Status | Results))
    if not cmds:
        raise FragmentError("no SyncML commands given (Status and Results are not commands)")
    unknown = [c.name for c in cmds if isinstance(c, UnknownCommand)]
    if unknown:
        raise FragmentError(f"unknown SyncML command(s): {', '.join(unknown)}")
    return cmds


def split_fragment(xml: str) -> list[str]:
    """One re-encoded fragment per top-level command (each is queued and tracked on its own)."""
    return [codec.encode_command(c) for c in parse_fragment(xml)]


def renumber(cmd: Command, next_id: Callable[[], str]) -> tuple[Command, list[str]]:
    """Give a command (and everything inside an Atomic/Sequence) fresh CmdIDs, in order."""
    ids: list[str] = []

    def walk(c: Command) -> Command:
        new_id = next_id()
        ids.append(new_id)
        if isinstance(c, Container):
            return dataclasses.replace(c, cmd_id=new_id,
                                       commands=tuple(walk(s) for s in c.commands))
        if isinstance(c, ItemCommand | Alert | UnknownCommand):
            return dataclasses.replace(c, cmd_id=new_id)
        return c

    return walk(cmd), ids
