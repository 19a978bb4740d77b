"""Large objects (OMA-TS-DM_Protocol §7, MS-MDM §2.2.7.2 note <14>), both directions, sans-IO.

Incoming: the server splits a Data too big for one message over several commands of the same
kind and target; every chunk but the last carries <MoreData/>, the first carries Meta/Size (the
size of the whole Data). The client answers 213 (chunked item accepted and buffered) to each
chunk but the last; the last is answered by executing the reassembled command, or 424 when the
reassembled size differs from Meta/Size. A command that interrupts an unfinished object makes
the client drop it and send Alert 1225 (end of data for chunked object not received).

Outgoing: a Results item bigger than what fits in the server's MaxMsgSize is cut into chunks
sent in consecutive messages, <MoreData/> on all but the last, Meta/Size on the first.

Sizes are counted as the UTF-8 bytes of Data's character content as transmitted (after XML
unescaping), the same way on both sides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from agent.syncml._text import escape
from agent.syncml.messages import Cmd, Item, ItemCommand, Meta, StatusCode

CHUNKABLE = frozenset({Cmd.ADD, Cmd.REPLACE, Cmd.EXEC})


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class ChunkResult:
    """What the session does with one incoming command."""

    command: ItemCommand | None = None  # execute this (the command itself, or reassembled)
    status: int | None = None  # else answer the command with this code
    abandoned: str | None = None  # LocURI of an unfinished object this command interrupted


@dataclass
class _Pending:
    kind: Cmd
    target: str
    size: int
    first: ItemCommand
    parts: list[str]
    received: int = 0


@dataclass(frozen=True)
class _Rejected:
    kind: Cmd
    target: str
    code: int


class Reassembler:
    def __init__(self, max_obj_size: int) -> None:
        self.max_obj_size = max_obj_size
        self._pending: _Pending | None = None
        self._rejected: _Rejected | None = None  # answer the rest of a refused object alike

    @property
    def busy(self) -> bool:
        """An object is being received or refused: every command must go through feed()."""
        return self._pending is not None or self._rejected is not None

    @property
    def pending_target(self) -> str | None:
        return None if self._pending is None else self._pending.target

    def feed(self, cmd: ItemCommand) -> ChunkResult:
        key = _key(cmd)
        abandoned = None
        if self._pending is not None:
            if key == (self._pending.kind, self._pending.target):
                return self._continue(self._pending, cmd)
            abandoned, self._pending = self._pending.target, None
        if self._rejected is not None:
            rejected, more = self._rejected, any(i.more_data for i in cmd.items)
            if key == (rejected.kind, rejected.target):
                if not more:
                    self._rejected = None
                return ChunkResult(status=rejected.code, abandoned=abandoned)
            self._rejected = None
        if not any(item.more_data for item in cmd.items):
            return ChunkResult(command=cmd, abandoned=abandoned)
        return dataclasses.replace(self._start(cmd), abandoned=abandoned)

    def _start(self, cmd: ItemCommand) -> ChunkResult:
        item = cmd.items[-1]
        target = item.target or ""
        if cmd.kind not in CHUNKABLE or len(cmd.items) != 1:
            # Only a single-item Add/Replace/Exec can carry a chunk (the chunked item must be
            # the last of its message, OMA-TS-DM_Protocol §7.1).
            return self._reject(cmd.kind, target, StatusCode.INCOMPLETE_COMMAND)
        size = (item.meta.size if item.meta else None) or (cmd.meta.size if cmd.meta else None)
        if size is None:  # the first chunk must announce the object's size
            return self._reject(cmd.kind, target, StatusCode.INCOMPLETE_COMMAND)
        if size > self.max_obj_size:
            return self._reject(cmd.kind, target, StatusCode.REQUEST_ENTITY_TOO_LARGE)
        pending = _Pending(cmd.kind, target, size, cmd, [])
        self._pending = pending
        return self._continue(pending, cmd)

    def _continue(self, p: _Pending, cmd: ItemCommand) -> ChunkResult:
        item = cmd.items[-1] if len(cmd.items) == 1 else None
        if item is None:
            self._pending = None
            return self._reject(p.kind, p.target, StatusCode.INCOMPLETE_COMMAND,
                                more=any(i.more_data for i in cmd.items))
        data = item.data or ""
        p.parts.append(data)
        p.received += utf8_len(data)
        if p.received > p.size:
            self._pending = None
            return self._reject(p.kind, p.target, StatusCode.SIZE_MISMATCH, more=item.more_data)
        if item.more_data:
            return ChunkResult(status=StatusCode.CHUNKED_ITEM_ACCEPTED)
        self._pending = None
        if p.received != p.size:
            return ChunkResult(status=StatusCode.SIZE_MISMATCH)
        first = p.first.items[0]
        whole = dataclasses.replace(first, data="".join(p.parts), more_data=False)
        return ChunkResult(command=ItemCommand(p.kind, cmd.cmd_id, (whole,), p.first.meta,
                                               cmd.no_resp, p.first.cred))

    def _reject(self, kind: Cmd, target: str, code: int, *, more: bool = True) -> ChunkResult:
        if more:
            self._rejected = _Rejected(kind, target, code)
        return ChunkResult(status=code)


def _key(cmd: ItemCommand) -> tuple[Cmd, str]:
    item = cmd.items[-1] if cmd.items else None
    return cmd.kind, (item.target or "") if item else ""


def split_text(text: str, budget: int) -> tuple[str, str]:
    """Cut `text` so that the escaped UTF-8 head is as long as fits in `budget` bytes (at least
    one character, so a chunked transfer always makes progress)."""
    lo, hi = 1, min(len(text), max(budget, 1))  # every character takes at least one byte
    while lo < hi:  # the largest n whose escaped head fits
        mid = (lo + hi + 1) // 2
        if len(escape(text[:mid]).encode("utf-8")) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo], text[lo:]


def chunk_item(item: Item, data: str, *, total: int | None, more: bool) -> Item:
    """One outgoing chunk of `item`: Meta/Size (`total`) on the first, MoreData on all but the
    last."""
    meta = item.meta
    if total is not None:
        meta = dataclasses.replace(meta or Meta(), size=total)
    return dataclasses.replace(item, data=data, more_data=more, meta=meta)
