"""What the client still has to send, and how it is packed into messages (sans-IO).

The session puts each server message's answers (Status, Results, client Alerts) in the outbox;
`pack` takes as much as fits in the server's MaxMsgSize (OMA-TS-DM_Protocol §8.2: a message
must not exceed the recipient's MaxMsgSize), cutting a Results item that does not fit into
chunks (chunks.py). What is left goes out in the next messages, after the server's Alert 1222.

Ordering: answers keep the executor's order (Results right after their Get's Status). When
earlier answers are still waiting, this message's Statuses go first (statuses may span messages,
MS-MDM §2.2.6.1) and its Results after the waiting ones, so an object being chunked is never
interleaved with another.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from agent.syncml import codec
from agent.syncml.chunks import chunk_item, split_text, utf8_len
from agent.syncml.messages import Alert, ItemCommand, Results, Status, SyncHdr

Outgoing = Status | Results | Alert | ItemCommand  # ItemCommand: package 1's Replace
MIN_CHUNK = 256  # smallest chunk worth a message of its own


def encoded_size(cmd: Outgoing, n: int) -> int:
    """Bytes `cmd` takes in a message as its n-th command (CmdID n)."""
    return utf8_len(codec.encode_command(cmd, str(n)))


class Outbox:
    def __init__(self) -> None:
        self._queue: deque[Outgoing] = deque()
        self._chunking: Results | None = None  # the rest of the object being chunked

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, answers: list[Outgoing]) -> None:
        if not self._queue:
            self._queue.extend(answers)
            return
        statuses = [a for a in answers if isinstance(a, Status)]
        others = [a for a in answers if not isinstance(a, Status)]
        self._queue.extendleft(reversed(statuses))
        self._queue.extend(others)

    def drop_chunked(self) -> bool:
        """The server gave up on our chunked object (Alert 1225): forget the rest of it."""
        if self._chunking is None:
            return False
        self._queue = deque(c for c in self._queue if c is not self._chunking)
        self._chunking = None
        return True

    def pack(self, header: SyncHdr, first: Status, budget: int | None,
             extra: list[Outgoing]) -> list[Outgoing]:
        """The body of the next message: `first` (the SyncHdr Status), what fits of the queue,
        then `extra` (Alert 1222), within `budget` bytes when the server set MaxMsgSize."""
        body: list[Outgoing] = [first]
        if budget is None:  # no MaxMsgSize from the server: everything goes
            if self._chunking is None:  # nothing to finish off: take the queue as it is
                body += self._queue
                self._queue.clear()
            while self._queue:
                body.append(self._take())
            return body + extra
        used = (codec.MESSAGE_OVERHEAD + utf8_len(codec.encode_header(header))
                + encoded_size(first, 1))
        reserve = sum(encoded_size(e, 99999) for e in extra)
        while self._queue:
            nxt = self._queue[0]
            size = encoded_size(nxt, len(body) + 1)
            if budget is None or used + size + reserve <= budget:
                body.append(self._take())
                used += size
                continue
            if isinstance(nxt, Results) and len(nxt.items) == 1 and nxt.items[0].data:
                room = budget - used - reserve - self._skeleton_size(nxt, len(body) + 1)
                if room >= MIN_CHUNK or len(body) == 1:
                    body.append(self._take_chunk(max(room, MIN_CHUNK)))
                    break
            if len(body) == 1:  # too big for any message and not splittable: send it alone
                body.append(self._take())
            break
        body.extend(extra)
        return body

    def _skeleton_size(self, results: Results, n: int) -> int:
        item = results.items[0]
        total = None if self._chunking is results else utf8_len(item.data or "")
        skeleton = dataclasses.replace(results, items=(chunk_item(item, "", total=total,
                                                                  more=True),))
        return encoded_size(skeleton, n)

    def _take(self) -> Outgoing:
        out = self._queue.popleft()
        if out is self._chunking:
            assert isinstance(out, Results)
            # The last chunk of the object: no MoreData (and no Size: not the first chunk).
            out = dataclasses.replace(out, items=(chunk_item(
                out.items[0], out.items[0].data or "", total=None, more=False),))
            self._chunking = None
        return out

    def _take_chunk(self, room: int) -> Results:
        results = self._queue[0]
        assert isinstance(results, Results)
        item = results.items[0]
        data = item.data or ""
        first = self._chunking is not results
        head, rest = split_text(data, room)
        if not rest:
            out = self._take()
            assert isinstance(out, Results)
            return out
        remainder = dataclasses.replace(results, items=(dataclasses.replace(item, data=rest),))
        self._queue[0] = remainder
        self._chunking = remainder
        return dataclasses.replace(results, items=(chunk_item(
            item, head, total=utf8_len(data) if first else None, more=True),))
