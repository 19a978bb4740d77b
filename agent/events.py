"""The event log: diagnostic events as JSON lines in the state dir, mirrored to the Python log.

Each record is appended with a single `write()` on an O_APPEND descriptor, so several processes
(the daemon, a `dmagent certinst` run by hand) can write to the same file without interleaving.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.diagnostics import EventRecord, Level

log = logging.getLogger("dmagent.events")

_LOG_LEVEL = {Level.INFORMATION: logging.INFO, Level.WARNING: logging.WARNING,
              Level.ERROR: logging.ERROR}

EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class StoredEvent:
    time: str
    event_id: int
    level: str
    message: str
    data: dict[str, Any]
    device: str

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time, "id": self.event_id, "level": self.level,
                "message": self.message, "data": self.data, "device": self.device}


class EventLog:
    """Append-only event sink for one device."""

    def __init__(self, path: Path, device: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.device = device
        self._clock = clock

    def write(self, record: EventRecord) -> None:
        stamp = datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds")
        line = json.dumps({"time": stamp, "device": self.device, **record.as_dict()},
                          ensure_ascii=False, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        log.log(_LOG_LEVEL[record.level], "event %d: %s", int(record.event_id), record.message,
                extra={"event_id": int(record.event_id), "device": self.device})

    def read(self) -> list[StoredEvent]:
        return list(self._parse(self._lines()))

    def follow(self, poll: float = 0.5,
               stop: Callable[[], bool] = lambda: False) -> Iterator[StoredEvent]:
        """Yield existing events, then new ones as they are appended (like `tail -f`)."""
        offset = 0
        while True:
            try:
                with self.path.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
            except FileNotFoundError:
                chunk = b""
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            yield from self._parse(complete.decode(errors="replace").splitlines())
            if stop():
                return
            time.sleep(poll)

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    @staticmethod
    def _parse(lines: list[str]) -> Iterator[StoredEvent]:
        for line in lines:
            try:
                raw = json.loads(line)
                yield StoredEvent(raw["time"], int(raw["id"]), raw["level"], raw["message"],
                                  raw.get("data", {}), raw.get("device", ""))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash mid-write is skipped, never fatal
