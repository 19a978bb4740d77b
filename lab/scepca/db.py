"""The CA's database of requests and issued certificates (SQLite, safe across processes).

One row per request (PKCSReq or RenewalReq): its transaction id, status (`issued`, `pending`,
`rejected`, `revoked`), who asked (the signer certificate's subject), why it was decided so,
and for issued ones the serial, thumbprint, expiry and the certificate. Every policy decision
(challenge verification, approval, rejection) is also appended to `decisions`.

micromdm scepserver 2.1.0 keeps its depot in files and loses or duplicates serials under
parallel enrollments. Here every state change is one `BEGIN IMMEDIATE` transaction (SQLite's
writer lock, shared by every process using the file, WAL so readers never wait), serial
numbers are random and UNIQUE, and a transition (pending → issued) re-reads the row inside the
transaction that makes it, so two servers or a server and `approve` can never both act on it.
A new connection per unit of work keeps the object free of thread affinity.
"""

from __future__ import annotations

import enum
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT NOT NULL,
    message_type INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('issued', 'pending', 'rejected', 'revoked')),
    subject TEXT NOT NULL DEFAULT '',
    requester TEXT NOT NULL DEFAULT '',
    signer_key TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    csr BLOB,
    csr_sha256 TEXT NOT NULL DEFAULT '',
    template TEXT NOT NULL DEFAULT '',
    serial TEXT UNIQUE,
    thumbprint TEXT,
    not_after TEXT,
    cert BLOB,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    approved INTEGER NOT NULL DEFAULT 0,
    approve_at REAL,
    approve_polls INTEGER,
    polls INTEGER NOT NULL DEFAULT 0,
    device_id TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    notify_hresult INTEGER,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS requests_txid ON requests (transaction_id);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    transaction_id TEXT NOT NULL,
    message_type INTEGER NOT NULL,
    decider TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    requester TEXT NOT NULL DEFAULT ''
);
"""


class Status(enum.StrEnum):
    ISSUED = "issued"
    PENDING = "pending"
    REJECTED = "rejected"
    REVOKED = "revoked"


@dataclass(frozen=True)
class RequestRow:
    id: int
    transaction_id: str
    message_type: int
    status: Status
    subject: str
    requester: str
    signer_key: str
    reason: str
    csr: bytes | None
    csr_sha256: str
    template: str
    serial: str | None
    thumbprint: str | None
    not_after: str | None
    cert: bytes | None
    created: float
    updated: float
    approved: bool
    approve_at: float | None
    approve_polls: int | None
    polls: int
    device_id: str
    user_id: str
    request_id: str
    notify_hresult: int | None
    revoked_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RequestRow:
        d = dict(row)
        d["status"] = Status(d["status"])
        d["approved"] = bool(d["approved"])
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (no blobs)."""
        return {"id": self.id, "transaction_id": self.transaction_id,
                "message_type": self.message_type, "status": self.status.value,
                "subject": self.subject, "requester": self.requester, "reason": self.reason,
                "template": self.template, "serial": self.serial,
                "thumbprint": self.thumbprint, "not_after": self.not_after,
                "created": self.created, "updated": self.updated, "approved": self.approved,
                "approve_at": self.approve_at, "approve_polls": self.approve_polls,
                "polls": self.polls, "device_id": self.device_id, "user_id": self.user_id,
                "request_id": self.request_id, "notify_hresult": self.notify_hresult,
                "revoked_at": self.revoked_at}


@dataclass(frozen=True)
class Decision:
    time: float
    transaction_id: str
    message_type: int
    decider: str
    accepted: bool
    reason: str
    requester: str


class SerialCollision(Exception):
    """The random serial is already taken (retry with another)."""


class CADatabase:
    def __init__(self, path: Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        if not self.path.exists():  # pending CSRs carry challenge passwords: owner only
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's writer lock from its first statement."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    # --- reads ----------------------------------------------------------------------------

    @staticmethod
    def latest_for(conn: sqlite3.Connection, transaction_id: str) -> RequestRow | None:
        row = conn.execute("SELECT * FROM requests WHERE transaction_id = ? "
                           "ORDER BY id DESC LIMIT 1", (transaction_id,)).fetchone()
        return None if row is None else RequestRow.from_row(row)

    def get(self, transaction_id: str) -> RequestRow | None:
        with self.read() as conn:
            return self.latest_for(conn, transaction_id)

    def by_serial(self, serial: int) -> RequestRow | None:
        with self.read() as conn:
            row = conn.execute("SELECT * FROM requests WHERE serial = ?",
                               (serial_hex(serial),)).fetchone()
        return None if row is None else RequestRow.from_row(row)

    def requests(self, status: Status | None = None) -> list[RequestRow]:
        with self.read() as conn:
            if status is None:
                rows = conn.execute("SELECT * FROM requests ORDER BY id").fetchall()
            else:
                rows = conn.execute("SELECT * FROM requests WHERE status = ? ORDER BY id",
                                    (status.value,)).fetchall()
        return [RequestRow.from_row(r) for r in rows]

    def decisions(self, transaction_id: str | None = None) -> list[Decision]:
        with self.read() as conn:
            if transaction_id is None:
                rows = conn.execute("SELECT * FROM decisions ORDER BY id").fetchall()
            else:
                rows = conn.execute("SELECT * FROM decisions WHERE transaction_id = ? "
                                    "ORDER BY id", (transaction_id,)).fetchall()
        return [Decision(r["time"], r["transaction_id"], r["message_type"], r["decider"],
                         bool(r["accepted"]), r["reason"], r["requester"]) for r in rows]

    def revoked(self) -> list[tuple[int, float]]:
        with self.read() as conn:
            rows = conn.execute("SELECT serial, revoked_at FROM requests "
                                "WHERE status = 'revoked'").fetchall()
        return [(int(r["serial"], 16), float(r["revoked_at"])) for r in rows]

    # --- writes (inside `write()`) --------------------------------------------------------

    @staticmethod
    def add_decision(conn: sqlite3.Connection, *, transaction_id: str, message_type: int,
                     decider: str, accepted: bool, reason: str, requester: str,
                     now: float | None = None) -> None:
        conn.execute("INSERT INTO decisions (time, transaction_id, message_type, decider, "
                     "accepted, reason, requester) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (time.time() if now is None else now, transaction_id, message_type,
                      decider, int(accepted), reason, requester))

    @staticmethod
    def insert(conn: sqlite3.Connection, **fields: Any) -> int:
        now = fields.pop("now", None) or time.time()
        fields.setdefault("created", now)
        fields.setdefault("updated", now)
        if isinstance(fields.get("status"), Status):
            fields["status"] = fields["status"].value
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        try:
            cur = conn.execute(f"INSERT INTO requests ({cols}) VALUES ({marks})",  # noqa: S608
                               tuple(fields.values()))
        except sqlite3.IntegrityError as exc:
            if "serial" in str(exc):
                raise SerialCollision(str(exc)) from None
            raise
        return int(cur.lastrowid or 0)

    @staticmethod
    def update(conn: sqlite3.Connection, row_id: int, **fields: Any) -> None:
        fields.setdefault("updated", time.time())
        if isinstance(fields.get("status"), Status):
            fields["status"] = fields["status"].value
        sets = ", ".join(f"{k} = ?" for k in fields)
        try:
            conn.execute(f"UPDATE requests SET {sets} WHERE id = ?",  # noqa: S608
                         (*fields.values(), row_id))
        except sqlite3.IntegrityError as exc:
            if "serial" in str(exc):
                raise SerialCollision(str(exc)) from None
            raise

    # --- operator actions (the CLI) ------------------------------------------------------

    def approve(self, transaction_id: str, *, who: str = "operator") -> RequestRow:
        """Mark the pending request approved; the next CertPoll gets the certificate."""
        with self.write() as conn:
            row = self.latest_for(conn, transaction_id)
            if row is None:
                raise LookupError(f"no request with transaction id {transaction_id}")
            if row.status is not Status.PENDING:
                raise LookupError(f"request {transaction_id} is {row.status.value}, "
                                  "not pending")
            self.update(conn, row.id, approved=1)
            self.add_decision(conn, transaction_id=transaction_id,
                              message_type=row.message_type, decider=who, accepted=True,
                              reason="approved by the operator", requester=row.requester)
            new = self.latest_for(conn, transaction_id)
        assert new is not None
        return new

    def reject(self, transaction_id: str, reason: str, *, who: str = "operator") -> RequestRow:
        with self.write() as conn:
            row = self.latest_for(conn, transaction_id)
            if row is None:
                raise LookupError(f"no request with transaction id {transaction_id}")
            if row.status is not Status.PENDING:
                raise LookupError(f"request {transaction_id} is {row.status.value}, "
                                  "not pending")
            self.update(conn, row.id, status=Status.REJECTED, reason=reason)
            self.add_decision(conn, transaction_id=transaction_id,
                              message_type=row.message_type, decider=who, accepted=False,
                              reason=reason, requester=row.requester)
            new = self.latest_for(conn, transaction_id)
        assert new is not None
        return new

    def revoke(self, serial: int, *, now: float | None = None) -> RequestRow:
        with self.write() as conn:
            row = conn.execute("SELECT * FROM requests WHERE serial = ?",
                               (serial_hex(serial),)).fetchone()
            if row is None:
                raise LookupError(f"no certificate with serial {serial_hex(serial)}")
            rec = RequestRow.from_row(row)
            if rec.status is not Status.ISSUED:
                raise LookupError(f"certificate {rec.serial} is {rec.status.value}")
            self.update(conn, rec.id, status=Status.REVOKED,
                        revoked_at=time.time() if now is None else now)
            out = conn.execute("SELECT * FROM requests WHERE id = ?", (rec.id,)).fetchone()
        return RequestRow.from_row(out)


def serial_hex(serial: int) -> str:
    """Serials as Windows shows them: upper-case hex, even length."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text
