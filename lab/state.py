"""The lab's state: one SQLite database shared by the MDM server and the CSR validator.

The validator runs as a separate process (micromdm scepserver spawns it per CSR), so the database
is the meeting point: WAL mode, a busy timeout, and every read-modify-write inside
`BEGIN IMMEDIATE` (one writer at a time). "Mark a challenge used" is a single conditional UPDATE,
so two processes presenting the same challenge at once cannot both win.

Tables: devices (DeviceID, name, UPN, groups, last session, reported values), assignments,
challenges (id, device, profile, request id, expiry, used-at), crs (Intune's CertRequestStatus:
device, request id, transaction id, thumbprint, serial, expiry, status, HRESULT, reason),
commands (the per-device queue), responses (Status/Results per CmdRef), messages (recorded
SyncML, both directions), sessions, deliveries (per device per profile), roots.

Times are epoch seconds (REAL); callers pass `now` where a decision depends on it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices(
  device_id TEXT PRIMARY KEY, name TEXT, upn TEXT, aad_device_id TEXT, serial TEXT,
  groups TEXT NOT NULL DEFAULT '[]', auth_password TEXT, info TEXT NOT NULL DEFAULT '{}',
  first_seen REAL, last_session REAL, sessions INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reported(
  device_id TEXT NOT NULL, uri TEXT NOT NULL, value TEXT, format TEXT, status INTEGER, at REAL,
  PRIMARY KEY(device_id, uri));
CREATE TABLE IF NOT EXISTS assignments(
  profile_id TEXT NOT NULL, kind TEXT NOT NULL CHECK(kind IN ('device', 'group')),
  target TEXT NOT NULL, at REAL, PRIMARY KEY(profile_id, kind, target));
CREATE TABLE IF NOT EXISTS challenges(
  id TEXT PRIMARY KEY, device_id TEXT NOT NULL, profile_id TEXT NOT NULL, unique_id TEXT,
  request_id TEXT, issued_at REAL, expires_at REAL, used_at REAL, used_by TEXT);
CREATE TABLE IF NOT EXISTS crs(
  id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, device_id TEXT, upn TEXT, profile_id TEXT,
  unique_id TEXT, request_id TEXT, challenge_id TEXT, transaction_id TEXT, spki_sha1 TEXT,
  subject TEXT, thumbprint TEXT, serial TEXT, not_before REAL, expires REAL,
  status TEXT NOT NULL, hresult INTEGER NOT NULL DEFAULT 0, reason TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS crs_spki ON crs(spki_sha1);
CREATE TABLE IF NOT EXISTS sessions(
  device_id TEXT NOT NULL, session_id TEXT NOT NULL, started REAL, updated REAL,
  state TEXT NOT NULL DEFAULT '{}', closed INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(device_id, session_id));
CREATE TABLE IF NOT EXISTS commands(
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, xml TEXT NOT NULL,
  origin TEXT NOT NULL, purpose TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL,
  created REAL, session_id TEXT, msg_id TEXT, cmd_id TEXT, cmd_ids TEXT, sent_at REAL,
  done_at REAL);
CREATE INDEX IF NOT EXISTS commands_device ON commands(device_id, state, id);
CREATE TABLE IF NOT EXISTS responses(
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, session_id TEXT NOT NULL,
  msg_ref TEXT, cmd_ref TEXT, kind TEXT NOT NULL, cmd TEXT, code INTEGER,
  items TEXT NOT NULL DEFAULT '[]', at REAL);
CREATE INDEX IF NOT EXISTS responses_ref ON responses(device_id, session_id, cmd_ref);
CREATE TABLE IF NOT EXISTS messages(
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT, session_id TEXT, msg_id TEXT,
  direction TEXT NOT NULL, at REAL, http_status INTEGER, body TEXT);
CREATE INDEX IF NOT EXISTS messages_device ON messages(device_id, id);
CREATE TABLE IF NOT EXISTS deliveries(
  device_id TEXT NOT NULL, profile_id TEXT NOT NULL, unique_id TEXT NOT NULL,
  scope TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  challenge_id TEXT, last_sent REAL, sessions_since INTEGER NOT NULL DEFAULT 0,
  status INTEGER, error_code INTEGER, thumbprint TEXT, not_before REAL, not_after REAL,
  renew_at REAL, detail TEXT, updated REAL, nodecache_id TEXT, nodecache_expected TEXT,
  PRIMARY KEY(device_id, profile_id));
CREATE TABLE IF NOT EXISTS roots(
  device_id TEXT NOT NULL, scope TEXT NOT NULL, thumbprint TEXT NOT NULL, at REAL,
  PRIMARY KEY(device_id, scope, thumbprint));
"""

Row = dict[str, Any]

_DEVICE_FIELDS = ("name", "upn", "aad_device_id", "serial", "groups", "auth_password", "info")
_DELIVERY_FIELDS = ("unique_id", "scope", "state", "attempts", "challenge_id", "last_sent",
                    "sessions_since", "status", "error_code", "thumbprint", "not_before",
                    "not_after", "renew_at", "detail", "nodecache_id", "nodecache_expected")
_CRS_FIELDS = ("device_id", "upn", "profile_id", "unique_id", "request_id", "challenge_id",
               "transaction_id", "spki_sha1", "subject", "thumbprint", "serial", "not_before",
               "expires", "status", "hresult", "reason", "detail")


def _row(r: sqlite3.Row | None) -> Row | None:
    if r is None:
        return None
    d = dict(r)
    for key in ("groups", "info", "purpose", "cmd_ids", "items"):
        if key in d and isinstance(d[key], str):
            with contextlib.suppress(ValueError):
                d[key] = json.loads(d[key])
    return d


class LabState:
    """One connection; safe to share between threads of one process (serialized by a lock)."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (the validator may be killed
        # by scepserver); only an OS crash can lose the last commits. A lab, not a ledger.
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.transaction():
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            self._migrate()

    def _migrate(self) -> None:
        """Columns added after a lab directory may have been created (additive only)."""
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(deliveries)")}
        for column in ("nodecache_id", "nodecache_expected"):
            if column not in have:
                self.db.execute(f"ALTER TABLE deliveries ADD COLUMN {column} TEXT")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> LabState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (re-entrant: inner blocks join the outer transaction)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.db
                finally:
                    self._depth -= 1
                return
            self.db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.db
            except BaseException:
                self._depth = 0
                self.db.execute("ROLLBACK")
                raise
            self._depth = 0
            self.db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Row | None:
        with self._lock:
            return _row(self.db.execute(sql, args).fetchone())

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Row]:
        with self._lock:
            return [r for r in (_row(x) for x in self.db.execute(sql, args).fetchall())
                    if r is not None]

    # --- devices --------------------------------------------------------------------------

    def ensure_device(self, device_id: str, now: float | None = None) -> Row:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO devices(device_id, first_seen) VALUES(?, ?)",
                       (device_id, now or time.time()))
        dev = self.get_device(device_id)
        assert dev is not None
        return dev

    def get_device(self, device_id: str) -> Row | None:
        return self._one("SELECT * FROM devices WHERE device_id = ?", (device_id,))

    def list_devices(self) -> list[Row]:
        return self._all("SELECT * FROM devices ORDER BY device_id")

    def set_device(self, device_id: str, **fields: Any) -> Row:
        bad = set(fields) - set(_DEVICE_FIELDS)
        if bad:
            raise ValueError(f"unknown device field(s): {', '.join(sorted(bad))}")
        with self.transaction() as db:
            self.ensure_device(device_id)
            for key, raw in fields.items():
                value = json.dumps(raw) if key in ("groups", "info") else raw
                db.execute(f"UPDATE devices SET {key} = ? WHERE device_id = ?",  # noqa: S608
                           (value, device_id))
        dev = self.get_device(device_id)
        assert dev is not None
        return dev

    def merge_device_info(self, device_id: str, info: dict[str, str]) -> None:
        with self.transaction():
            dev = self.ensure_device(device_id)
            merged = {**dev["info"], **info}
            self.set_device(device_id, info=merged)

    def touch_session(self, device_id: str, now: float) -> None:
        with self.transaction() as db:
            self.ensure_device(device_id, now)
            db.execute("UPDATE devices SET last_session = ?, sessions = sessions + 1 "
                       "WHERE device_id = ?", (now, device_id))

    # --- reported values -------------------------------------------------------------------

    def set_reported(self, device_id: str, uri: str, value: str | None, fmt: str | None,
                     status: int, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO reported(device_id, uri, value, format, status, at) "
                       "VALUES(?, ?, ?, ?, ?, ?) ON CONFLICT(device_id, uri) DO UPDATE SET "
                       "value = excluded.value, format = excluded.format, "
                       "status = excluded.status, at = excluded.at",
                       (device_id, uri, value, fmt, status, now))

    def reported(self, device_id: str) -> dict[str, Row]:
        return {r["uri"]: r for r in self._all(
            "SELECT * FROM reported WHERE device_id = ? ORDER BY uri", (device_id,))}

    # --- assignments -----------------------------------------------------------------------

    def assign(self, profile_id: str, kind: str, target: str, now: float | None = None) -> bool:
        with self.transaction() as db:
            cur = db.execute("INSERT OR IGNORE INTO assignments(profile_id, kind, target, at) "
                             "VALUES(?, ?, ?, ?)", (profile_id, kind, target, now or time.time()))
            return cur.rowcount > 0

    def unassign(self, profile_id: str, kind: str, target: str) -> bool:
        with self.transaction() as db:
            cur = db.execute("DELETE FROM assignments WHERE profile_id = ? AND kind = ? "
                             "AND target = ?", (profile_id, kind, target))
            return cur.rowcount > 0

    def assignments(self, profile_id: str | None = None) -> list[Row]:
        if profile_id is None:
            return self._all("SELECT * FROM assignments ORDER BY profile_id, kind, target")
        return self._all("SELECT * FROM assignments WHERE profile_id = ? ORDER BY kind, target",
                         (profile_id,))

    def assigned_profiles(self, device_id: str) -> set[str]:
        """Profiles targeted at the device directly, through one of its groups, or to '*'."""
        dev = self.get_device(device_id)
        groups = set(dev["groups"]) if dev else set()
        out = set()
        for a in self.assignments():
            if (a["kind"] == "device" and a["target"] == device_id) or \
                    (a["kind"] == "group" and (a["target"] == "*" or a["target"] in groups)):
                out.add(a["profile_id"])
        return out

    # --- challenges ------------------------------------------------------------------------

    def record_challenge(self, challenge_id: str, device_id: str, profile_id: str,
                         unique_id: str, request_id: str, issued_at: float,
                         expires_at: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO challenges(id, device_id, profile_id, unique_id, request_id,"
                       " issued_at, expires_at) VALUES(?, ?, ?, ?, ?, ?, ?)",
                       (challenge_id, device_id, profile_id, unique_id, request_id, issued_at,
                        expires_at))

    def get_challenge(self, challenge_id: str) -> Row | None:
        return self._one("SELECT * FROM challenges WHERE id = ?", (challenge_id,))

    def use_challenge(self, challenge_id: str, now: float, used_by: str) -> str:
        """Mark used atomically → "ok", "reused" (used before) or "unknown" (never issued)."""
        with self.transaction() as db:
            cur = db.execute("UPDATE challenges SET used_at = ?, used_by = ? "
                             "WHERE id = ? AND used_at IS NULL", (now, used_by, challenge_id))
            if cur.rowcount == 1:
                return "ok"
            exists = db.execute("SELECT 1 FROM challenges WHERE id = ?",
                                (challenge_id,)).fetchone()
            return "reused" if exists else "unknown"

    def challenges(self, device_id: str | None = None) -> list[Row]:
        if device_id is None:
            return self._all("SELECT * FROM challenges ORDER BY issued_at")
        return self._all("SELECT * FROM challenges WHERE device_id = ? ORDER BY issued_at",
                         (device_id,))

    # --- CRS records -----------------------------------------------------------------------

    def add_crs(self, now: float, **fields: Any) -> int:
        bad = set(fields) - set(_CRS_FIELDS)
        if bad:
            raise ValueError(f"unknown CRS field(s): {', '.join(sorted(bad))}")
        cols = ["at", *fields]
        with self.transaction() as db:
            cur = db.execute(f"INSERT INTO crs({', '.join(cols)}) "
                             f"VALUES({', '.join('?' * len(cols))})", (now, *fields.values()))
            return int(cur.lastrowid or 0)

    def crs(self, device_id: str | None = None) -> list[Row]:
        if device_id is None:
            return self._all("SELECT * FROM crs ORDER BY id")
        return self._all("SELECT * FROM crs WHERE device_id = ? ORDER BY id", (device_id,))

    def crs_for_thumbprint(self, thumbprint: str) -> Row | None:
        return self._one("SELECT * FROM crs WHERE thumbprint = ? ORDER BY id DESC LIMIT 1",
                         (thumbprint.upper(),))

    def complete_crs(self, spki_sha1: str, *, thumbprint: str, serial: str, not_before: float,
                     expires: float) -> bool:
        """Attach the issued certificate to the latest verified request for its key."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM crs WHERE spki_sha1 = ? AND status IN "
                             "('verified', 'issued') ORDER BY id DESC LIMIT 1",
                             (spki_sha1,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE crs SET status = 'issued', thumbprint = ?, serial = ?, "
                       "not_before = ?, expires = ? WHERE id = ?",
                       (thumbprint.upper(), serial, not_before, expires, row["id"]))
            return True

    # --- sessions --------------------------------------------------------------------------

    def load_session(self, device_id: str, session_id: str) -> dict[str, Any] | None:
        r = self._one("SELECT state FROM sessions WHERE device_id = ? AND session_id = ?",
                      (device_id, session_id))
        if r is None:
            return None
        state = json.loads(r["state"])
        assert isinstance(state, dict)
        return state

    def save_session(self, device_id: str, session_id: str, state: dict[str, Any],
                     now: float, *, closed: bool = False) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO sessions(device_id, session_id, started, updated, state, "
                       "closed) VALUES(?, ?, ?, ?, ?, ?) ON CONFLICT(device_id, session_id) "
                       "DO UPDATE SET updated = excluded.updated, state = excluded.state, "
                       "closed = excluded.closed",
                       (device_id, session_id, now, now, json.dumps(state), int(closed)))

    def sessions(self, device_id: str) -> list[Row]:
        return self._all("SELECT device_id, session_id, started, updated, closed FROM sessions "
                         "WHERE device_id = ? ORDER BY started", (device_id,))

    # --- the command queue -----------------------------------------------------------------

    def enqueue(self, device_id: str, xml: str, *, origin: str = "api",
                purpose: dict[str, Any] | None = None, now: float | None = None) -> int:
        with self.transaction() as db:
            self.ensure_device(device_id)
            cur = db.execute("INSERT INTO commands(device_id, xml, origin, purpose, state, "
                             "created) VALUES(?, ?, ?, ?, 'queued', ?)",
                             (device_id, xml, origin, json.dumps(purpose or {}),
                              now or time.time()))
            return int(cur.lastrowid or 0)

    def queued(self, device_id: str) -> list[Row]:
        return self._all("SELECT * FROM commands WHERE device_id = ? AND state = 'queued' "
                         "ORDER BY id", (device_id,))

    def mark_sent(self, command_id: int, *, session_id: str, msg_id: str, cmd_id: str,
                  cmd_ids: Any, xml: str, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE commands SET state = 'sent', session_id = ?, msg_id = ?, "
                       "cmd_id = ?, cmd_ids = ?, xml = ?, sent_at = ? WHERE id = ?",
                       (session_id, msg_id, cmd_id, json.dumps(cmd_ids), xml, now, command_id))

    def mark_done(self, command_id: int, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE commands SET state = 'done', done_at = ? WHERE id = ?",
                       (now, command_id))

    def requeue_unanswered(self, device_id: str, session_id: str) -> int:
        """Commands sent in a session that ended without their Status go back to the queue."""
        with self.transaction() as db:
            cur = db.execute("UPDATE commands SET state = 'queued', session_id = NULL, "
                             "msg_id = NULL, cmd_id = NULL, cmd_ids = NULL, sent_at = NULL "
                             "WHERE device_id = ? AND session_id = ? AND state = 'sent' "
                             "AND origin = 'api'", (device_id, session_id))
            db.execute("UPDATE commands SET state = 'lost' WHERE device_id = ? "
                       "AND session_id = ? AND state = 'sent'", (device_id, session_id))
            return cur.rowcount

    def get_command(self, command_id: int) -> Row | None:
        return self._one("SELECT * FROM commands WHERE id = ?", (command_id,))

    def commands(self, device_id: str, state: str | None = None) -> list[Row]:
        if state is None:
            return self._all("SELECT * FROM commands WHERE device_id = ? ORDER BY id",
                             (device_id,))
        return self._all("SELECT * FROM commands WHERE device_id = ? AND state = ? ORDER BY id",
                         (device_id, state))

    def sent_in_session(self, device_id: str, session_id: str) -> list[Row]:
        return self._all("SELECT * FROM commands WHERE device_id = ? AND session_id = ? "
                         "ORDER BY id", (device_id, session_id))

    # --- responses (Status / Results) --------------------------------------------------------

    def add_response(self, device_id: str, session_id: str, *, msg_ref: str, cmd_ref: str,
                     kind: str, cmd: str | None, code: int | None, items: list[dict[str, Any]],
                     now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO responses(device_id, session_id, msg_ref, cmd_ref, kind, cmd,"
                       " code, items, at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (device_id, session_id, msg_ref, cmd_ref, kind, cmd, code,
                        json.dumps(items), now))

    def responses(self, device_id: str, session_id: str,
                  cmd_refs: list[str] | None = None) -> list[Row]:
        rows = self._all("SELECT * FROM responses WHERE device_id = ? AND session_id = ? "
                         "ORDER BY id", (device_id, session_id))
        if cmd_refs is None:
            return rows
        wanted = set(cmd_refs)
        return [r for r in rows if r["cmd_ref"] in wanted]

    # --- recorded messages -------------------------------------------------------------------

    def add_message(self, *, device_id: str | None, session_id: str | None, msg_id: str | None,
                    direction: str, body: str, now: float, http_status: int = 200) -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO messages(device_id, session_id, msg_id, direction, at,"
                             " http_status, body) VALUES(?, ?, ?, ?, ?, ?, ?)",
                             (device_id, session_id, msg_id, direction, now, http_status, body))
            return int(cur.lastrowid or 0)

    def messages(self, device_id: str, *, session_id: str | None = None,
                 after_id: int = 0, limit: int = 1000) -> list[Row]:
        if session_id is None:
            return self._all("SELECT * FROM messages WHERE device_id = ? AND id > ? "
                             "ORDER BY id LIMIT ?", (device_id, after_id, limit))
        return self._all("SELECT * FROM messages WHERE device_id = ? AND session_id = ? "
                         "AND id > ? ORDER BY id LIMIT ?",
                         (device_id, session_id, after_id, limit))

    # --- deliveries and roots ---------------------------------------------------------------

    def get_delivery(self, device_id: str, profile_id: str) -> Row | None:
        return self._one("SELECT * FROM deliveries WHERE device_id = ? AND profile_id = ?",
                         (device_id, profile_id))

    def deliveries(self, device_id: str | None = None) -> list[Row]:
        if device_id is None:
            return self._all("SELECT * FROM deliveries ORDER BY device_id, profile_id")
        return self._all("SELECT * FROM deliveries WHERE device_id = ? ORDER BY profile_id",
                         (device_id,))

    def put_delivery(self, device_id: str, profile_id: str, now: float, **fields: Any) -> Row:
        bad = set(fields) - set(_DELIVERY_FIELDS)
        if bad:
            raise ValueError(f"unknown delivery field(s): {', '.join(sorted(bad))}")
        with self.transaction() as db:
            if self.get_delivery(device_id, profile_id) is None:
                base = {"unique_id": "", "scope": "device", "state": "pending", **fields}
                cols = ["device_id", "profile_id", "updated", *base]
                db.execute(f"INSERT INTO deliveries({', '.join(cols)}) "
                           f"VALUES({', '.join('?' * len(cols))})",
                           (device_id, profile_id, now, *base.values()))
            else:
                sets = ", ".join(f"{k} = ?" for k in ["updated", *fields])
                db.execute(f"UPDATE deliveries SET {sets} "  # noqa: S608
                           "WHERE device_id = ? AND profile_id = ?",
                           (now, *fields.values(), device_id, profile_id))
            row = self.get_delivery(device_id, profile_id)
        assert row is not None
        return row

    def delete_delivery(self, device_id: str, profile_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM deliveries WHERE device_id = ? AND profile_id = ?",
                       (device_id, profile_id))

    def has_root(self, device_id: str, scope: str, thumbprint: str) -> bool:
        return self._one("SELECT 1 AS x FROM roots WHERE device_id = ? AND scope = ? "
                         "AND thumbprint = ?", (device_id, scope, thumbprint)) is not None

    def add_root(self, device_id: str, scope: str, thumbprint: str, now: float) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO roots(device_id, scope, thumbprint, at) "
                       "VALUES(?, ?, ?, ?)", (device_id, scope, thumbprint, now))

    def remove_root(self, device_id: str, scope: str, thumbprint: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM roots WHERE device_id = ? AND scope = ? AND thumbprint = ?",
                       (device_id, scope, thumbprint))
