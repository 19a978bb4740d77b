"""A registry-like store: hives, case-insensitive keys and typed values in one SQLite file.

Windows semantics the rest of the agent relies on:
- key paths are case-insensitive and keep the case they were created with;
- writing a value or creating a key creates every missing intermediate key (RegCreateKeyEx);
- deleting a key deletes its whole subtree (RegDeleteTree);
- the roots are HKLM and HKU; HKCU is an alias of `HKU\\<current user SID>`.

Durability: WAL journal with `synchronous=FULL`, so a committed transaction survives a crash
and an interrupted one leaves nothing behind. Writers take the database lock up front
(`BEGIN IMMEDIATE`) and wait for each other (busy timeout), so several processes can share a
store without lost updates. `transaction()` nests through savepoints; a SyncML Atomic is one.

Speed (a DM session runs hundreds of reads and writes per message, for thousands of devices
per process): inside a transaction the store answers repeated lookups from memory. While this
connection holds the write lock (`BEGIN IMMEDIATE`) nobody else can change the database, so
what it read or wrote stays true until the transaction ends; the next transaction keeps the
cache only when `PRAGMA data_version` shows no other connection committed in between (SQLite:
"changes committed by any other connection"). A rollback that undid writes, and a subtree
delete, drop the cache. Savepoints are opened lazily, and a block whose only write is one
value the cache knows opens none (agent/regtx.py: the transactions, split from here).
Reads outside a transaction always go to SQLite.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Final

from agent.errors import LocalError, NotFoundError
from agent.regtx import UNKNOWN as _UNKNOWN
from agent.regtx import UPSERT as _UPSERT
from agent.regtx import Rollback, Transactions
from agent.regvalues import (
    CONVERTED,
    SZ,
    TYPES,
    RegData,
    RegType,
    RegValue,
    Row,
    Table,
    decode_data,
    decode_row,
    encode,
)

__all__ = ["ROOT_LONG_NAMES", "RegData", "RegType", "RegValue", "Registry", "Rollback", "fold"]

MAX_KEY_NAME: Final = 255
MAX_VALUE_NAME: Final = 16383

_ROOT_ALIASES: Final = {
    "HKLM": "HKLM", "HKEY_LOCAL_MACHINE": "HKLM",
    "HKU": "HKU", "HKEY_USERS": "HKU",
}
_CURRENT_USER_ALIASES: Final = ("HKCU", "HKEY_CURRENT_USER")
ROOT_LONG_NAMES: Final = {"HKLM": "HKEY_LOCAL_MACHINE", "HKU": "HKEY_USERS"}


def fold(name: str) -> str:
    """Case folding the way the registry compares names: per character upper-casing that never
    changes the length (Windows upper-cases 'ß' to itself, Python to 'SS')."""
    if name.isascii():
        return name.upper()
    return "".join(u if len(u := c.upper()) == 1 else c for c in name)


_NO_BLOCK: Final = nullcontext()
_SZ_NUMBER: Final = int(SZ)
_CACHE_LIMIT: Final = 4096  # entries per cache (per device: fleets run thousands); then over


class Registry(Transactions):
    """One device's registry store. Thread-safe; share one instance per process and device."""

    def __init__(self, path: Path, *, current_user_sid: str | None = None,
                 busy_timeout: float = 30.0) -> None:
        self.path = path
        self._current_user_sid = current_user_sid
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._init_transactions()
        # Caches (see the module docstring); valid only while `_cache_live`.
        self._key_ids: dict[str, int | None] = {}  # folded key path -> id, None = missing
        self._rows: dict[tuple[int, str], Row | None] = {}  # (key id, folded name) -> row
        self._subkeys: dict[str, list[str]] = {}  # folded key path -> subkey names, sorted
        # folded key path -> its subkey_values() table (see _Subtable)
        self._children_values: dict[str, _Subtable] = {}
        self._normalized: dict[str, tuple[str, str]] = {}  # path -> (canonical, folded)
        self._folded_names: dict[str, str] = {}  # value name -> fold(name)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                     check_same_thread=False)
        # One cursor for single statements: Connection.execute makes a new cursor per call,
        # which costs more than the statement itself for SAVEPOINT/RELEASE and key lookups.
        self._cur = self._conn.cursor()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            for root in ("HKLM", "HKU"):
                self._conn.execute(
                    "INSERT OR IGNORE INTO keys(path_lc, path, parent_lc) VALUES (?, ?, NULL)",
                    (root, root))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- paths -------------------------------------------------------------------------------

    def normalize(self, path: str) -> str:
        """Canonical form `HKLM\\A\\B` (root short name, segments as given, HKCU resolved)."""
        return self._canon(path)[0]

    @property
    def current_user_sid(self) -> str | None:
        return self._current_user_sid

    @current_user_sid.setter
    def current_user_sid(self, sid: str | None) -> None:
        self._current_user_sid = sid
        self._normalized.clear()  # HKCU paths resolve differently now

    def _canon(self, path: str) -> tuple[str, str]:
        """(canonical path, its folded form), memoized: CSPs build the same few key paths over
        and over."""
        hit = self._normalized.get(path)
        if hit is not None:
            return hit
        canon = self._normalize(path)
        if len(self._normalized) >= _CACHE_LIMIT:
            self._normalized.clear()
        result = self._normalized[path] = (canon, fold(canon))
        return result

    def _fold_name(self, name: str) -> str:
        """fold(name) for value names, memoized (a handful of names, read over and over)."""
        folded = self._folded_names.get(name)
        if folded is None:
            if len(self._folded_names) >= _CACHE_LIMIT:
                self._folded_names.clear()
            folded = self._folded_names[name] = fold(name)
        return folded

    def _normalize(self, path: str) -> str:
        parts = path.strip().strip("\\").split("\\")
        head = parts[0].upper()
        if head in _CURRENT_USER_ALIASES:
            if not self.current_user_sid:
                raise LocalError("HKCU is not available: no current user SID is configured",
                                 advice="set [device] user_sid in the config")
            parts = ["HKU", self.current_user_sid, *parts[1:]]
        elif head in _ROOT_ALIASES:
            parts[0] = _ROOT_ALIASES[head]
        else:
            raise LocalError(f"invalid registry root in {path!r}: use HKLM, HKCU or HKU")
        for seg in parts[1:]:
            if not seg:
                raise LocalError(f"invalid registry path {path!r}: empty key name")
            if len(seg) > MAX_KEY_NAME:
                raise LocalError(f"invalid registry path: key name longer than {MAX_KEY_NAME}")
        return "\\".join(parts)

    def hkcu(self) -> str:
        return self.normalize("HKCU")

    # --- transactions --------------------------------------------------------------------------

    def _drop_cache(self) -> None:  # (Transactions calls it)
        self._key_ids.clear()
        self._rows.clear()
        self._subkeys.clear()
        self._children_values.clear()

    # --- keys --------------------------------------------------------------------------------

    def create_key(self, path: str) -> str:
        """Create the key and any missing parents; return its canonical path."""
        canon, lc = self._canon(path)
        with self.transaction():
            self._ensure_key(canon, lc)
        return canon

    def key_exists(self, path: str) -> bool:
        lc = self._canon(path)[1]
        with self._lock:
            return self._key_id(lc) is not None

    def delete_key(self, path: str) -> bool:
        """Delete the key with its subtree. Roots and hive roots (HKU\\<SID>) stay deletable
        only below. Returns False when the key did not exist."""
        canon, lc = self._canon(path)
        if "\\" not in canon:
            raise LocalError(f"cannot delete the root key {canon}")
        # One statement (the values go with ON DELETE CASCADE): no savepoint of its own.
        with self._lock, (_NO_BLOCK if self._depth else self.transaction()):
            cur = self._write(
                "DELETE FROM keys WHERE path_lc = ? OR (path_lc > ? AND path_lc < ?)",
                (lc, lc + "\\", lc + "]"))  # ']' sorts right after '\\': the subtree range
            if cur.rowcount > 0:
                # The subtree's key ids (and their cached values) are gone; ids get reused.
                self._drop_cache()
            return cur.rowcount > 0

    def subkeys(self, path: str) -> list[str]:
        """Names of the direct subkeys, in stored case, sorted case-insensitively."""
        canon, lc = self._canon(path)
        with self._lock:
            self._require_key(canon, lc)
            names = self._subkeys.get(lc) if self._cache_live else None
            if names is None:
                rows = self._conn.execute(
                    "SELECT path FROM keys WHERE parent_lc = ? ORDER BY path_lc", (lc,))
                names = [r[0].rsplit("\\", 1)[1] for r in rows]
                if self._cache_live:
                    self._subkeys[lc] = names
            return list(names)

    def key_path(self, path: str) -> str:
        """The stored-case canonical path of an existing key."""
        canon, lc = self._canon(path)
        with self._lock:
            row = self._conn.execute("SELECT path FROM keys WHERE path_lc = ?",
                                     (lc,)).fetchone()
        if row is None:
            raise NotFoundError(f"registry key not found: {canon}")
        return str(row[0])

    def walk(self, path: str) -> Iterator[tuple[str, list[RegValue]]]:
        """Depth-first (key path, values) for the key and its subtree, children sorted."""
        canon, lc = self._canon(path)
        with self._lock:
            self._require_key(canon, lc)
            rows = self._conn.execute(
                "SELECT id, path, path_lc FROM keys WHERE path_lc = ? "
                "OR (path_lc > ? AND path_lc < ?)", (lc, lc + "\\", lc + "]")).fetchall()
            rows.sort(key=lambda r: r[2].split("\\"))
            result = [(r[1], self._values_of(r[0])) for r in rows]
        yield from result

    # --- values ------------------------------------------------------------------------------

    def set_value(self, path: str, name: str, type_: RegType, data: RegData) -> None:
        """Write a value, creating the key (and its parents) when missing."""
        if type_ is SZ and type(data) is str:  # the common case, valid as it is
            stored: str | int | bytes = data
        else:
            if type(type_) is not RegType:
                type_ = RegType(type_)
            stored = encode(type_, data)
        if len(name) > MAX_VALUE_NAME:
            raise LocalError(f"value name longer than {MAX_VALUE_NAME} characters")
        canon, lc = self._normalized.get(path) or self._canon(path)
        name_lc = self._folded_names.get(name) or self._fold_name(name)
        with self._lock:
            if self._depth:
                key_id = self._key_ids.get(lc) if self._cache_live else None
                if key_id is None:
                    key_id = self._key_id(lc)
                if key_id is not None:
                    # One statement, atomic by itself: no savepoint of its own needed.
                    self._upsert(key_id, lc, name_lc, name, type_, stored)
                    return
            with self.transaction():  # may create keys: several statements, all or nothing
                self._upsert(self._ensure_key(canon, lc), lc, name_lc, name, type_, stored)

    def _upsert(self, key_id: int, lc: str, name_lc: str, name: str, type_: RegType,
                stored: str | int | bytes) -> None:
        self._write_value(_UPSERT, (key_id, name_lc, name, _SZ_NUMBER if type_ is SZ
                                    else int(type_), stored), key_id, name_lc)
        if self._cache_live:
            self._rows[(key_id, name_lc)] = (name, type_, stored)
            if self._children_values:
                self._table_changed(lc, name_lc, stored if type_ is SZ or type_ not in CONVERTED
                                    else decode_data(type_, stored))

    def set_sz(self, path: str, name: str, data: str) -> None:
        self.set_value(path, name, SZ, data)

    def set_dword(self, path: str, name: str, data: int) -> None:
        self.set_value(path, name, RegType.REG_DWORD, data)

    def get_value(self, path: str, name: str) -> RegValue:
        """The value, or NotFoundError naming the key or the value that is missing."""
        canon, lc = self._canon(path)
        with self._lock:
            row = self._row(self._require_key(canon, lc), fold(name))
        if row is None:
            raise NotFoundError(f"registry value not found: {canon}\\{name or '(Default)'}")
        return decode_row(row)

    def query(self, path: str, name: str) -> RegData | None:
        """The value's data, or None when the key or value is missing."""
        lc = (self._normalized.get(path) or self._canon(path))[1]
        name_lc = self._folded_names.get(name) or self._fold_name(name)
        with self._lock:
            if self._cache_live:  # inline the cache hits: the hottest read of a DM session
                key_id = self._key_ids.get(lc, -1)
                if key_id == -1:
                    key_id = self._key_id(lc)
                if key_id is None:
                    return None
                row = self._rows.get((key_id, name_lc), _UNKNOWN)
                if row is _UNKNOWN:
                    row = self._row(key_id, name_lc)
            else:
                key_id = self._key_id(lc)
                row = None if key_id is None else self._row(key_id, name_lc)
        if row is None:
            return None
        return decode_data(row[1], row[2]) if row[1] in CONVERTED else row[2]

    def values(self, path: str) -> list[RegValue]:
        canon, lc = self._canon(path)
        with self._lock:
            return self._values_of(self._require_key(canon, lc))

    def subkey_values(self, path: str) -> Mapping[str, Mapping[str, RegData]]:
        """Every direct subkey (stored-case name, in `subkeys` order) with its values' data by
        folded value name (`fold("NodeURI")`): one query where a table of small keys (NodeCache
        nodes, tasks) would take one per value. NotFoundError when the key is missing. The
        result may be shared with later calls: do not modify it."""
        canon, lc = self._canon(path)
        with self._lock:
            self._require_key(canon, lc)
            if self._cache_live:
                hit = self._children_values.get(lc)
                if hit is not None:
                    return hit.hand_out()
            table: Table = {}
            for key_path, name_lc, type_num, raw in self._conn.execute(
                    'SELECT k.path, v.name_lc, v.type, v.data FROM keys k LEFT JOIN "values" v '
                    "ON v.key_id = k.id WHERE k.parent_lc = ? ORDER BY k.path_lc", (lc,)):
                values = table.setdefault(key_path.rsplit("\\", 1)[1], {})
                if name_lc is not None:
                    values[name_lc] = decode_data(TYPES[type_num], raw)
            if self._cache_live:
                self._children_values[lc] = _Subtable(table, {fold(n): n for n in table})
            return table

    def _table_changed(self, lc: str, name_lc: str, data: RegData | None) -> None:
        """A value of key `lc` was written (None: deleted): update the cached subkey_values()
        of its parent (copy-on-write, see _Subtable)."""
        parent_lc, _, child_lc = lc.rpartition("\\")
        entry = self._children_values.get(parent_lc)
        if entry is None:
            return
        if not entry.change(child_lc, name_lc, data):  # not a subkey the table knows
            del self._children_values[parent_lc]  # read it again next time

    def delete_value(self, path: str, name: str) -> bool:
        lc = (self._normalized.get(path) or self._canon(path))[1]
        name_lc = self._folded_names.get(name) or self._fold_name(name)
        with self._lock:
            if self._cache_live:  # known not to be there: nothing to do (the common case)
                key_id = self._key_ids.get(lc, -1)
                if key_id is None or (key_id != -1 and
                                      self._rows.get((key_id, name_lc), _UNKNOWN) is None):
                    return False
        # One statement: atomic by itself, so inside a transaction it needs no savepoint.
        with self._lock, (_NO_BLOCK if self._depth else self.transaction()):
            key_id = self._key_id(lc)
            if key_id is None:
                return False
            rows = self._rows
            if self._cache_live and rows.get((key_id, name_lc), _UNKNOWN) is None:
                return False  # known not to be there: no statement to run
            cur = self._write_value('DELETE FROM "values" WHERE key_id = ? AND name_lc = ?',
                                    (key_id, name_lc), key_id, name_lc)
            if self._cache_live:
                rows[(key_id, name_lc)] = None
                if self._children_values:
                    self._table_changed(lc, name_lc, None)
            return cur.rowcount > 0

    def integrity_check(self) -> str:
        with self._lock:
            return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])

    # --- internals (callers hold the lock) ------------------------------------------------------

    def _key_id(self, lc: str) -> int | None:
        if self._cache_live:
            try:
                return self._key_ids[lc]
            except KeyError:
                pass
        row = self._cur.execute("SELECT id FROM keys WHERE path_lc = ?", (lc,)).fetchone()
        key_id = None if row is None else int(row[0])
        if self._cache_live:
            if len(self._key_ids) >= _CACHE_LIMIT:
                self._drop_cache()
            self._key_ids[lc] = key_id
        return key_id

    def _row(self, key_id: int, name_lc: str) -> Row | None:
        if self._cache_live:
            try:
                return self._rows[(key_id, name_lc)]
            except KeyError:
                pass
        found = self._cur.execute(
            'SELECT name, type, data FROM "values" WHERE key_id = ? AND name_lc = ?',
            (key_id, name_lc)).fetchone()
        row: Row | None = None if found is None else (found[0], TYPES[found[1]], found[2])
        if self._cache_live:
            if len(self._rows) >= _CACHE_LIMIT:
                self._drop_cache()
            self._rows[(key_id, name_lc)] = row
        return row

    def _require_key(self, canon: str, lc: str) -> int:
        key_id = self._key_id(lc)
        if key_id is None:
            raise NotFoundError(f"registry key not found: {canon}")
        return key_id

    def _ensure_key(self, canon: str, lc: str) -> int:
        key_id = self._key_id(lc)
        if key_id is not None:
            return key_id
        parent, _, _ = canon.rpartition("\\")
        parent_lc = lc[:len(parent)]  # folding never changes the length
        self._ensure_key(parent, parent_lc)
        cur = self._write("INSERT INTO keys(path_lc, path, parent_lc) VALUES (?, ?, ?)",
                          (lc, canon, parent_lc))
        assert cur.lastrowid is not None
        if self._cache_live:
            self._key_ids[lc] = cur.lastrowid
            self._subkeys.pop(parent_lc, None)
            self._children_values.pop(parent_lc, None)
        return cur.lastrowid

    def _values_of(self, key_id: int) -> list[RegValue]:
        rows = self._conn.execute(
            'SELECT name, type, data FROM "values" WHERE key_id = ? ORDER BY name_lc', (key_id,))
        return [decode_row((r[0], TYPES[r[1]], r[2])) for r in rows]


class _Subtable:
    """A cached subkey_values() table that follows writes. What was handed out never changes
    under its holder: after a hand-out the first write copies the table, and each subkey's
    values are copied once before their first change; until the next hand-out the copies are
    this cache's own and change in place (a message writing many NodeCache nodes copies the
    table once, not once per write)."""

    __slots__ = ("names", "owned", "shared", "table")

    def __init__(self, table: Table, names: dict[str, str]) -> None:
        self.table = table
        self.names = names  # folded subkey name -> stored name
        self.shared = True  # `table` has been handed out
        self.owned: set[str] = set()  # subkeys whose values dict is not handed out

    def hand_out(self) -> Table:
        self.shared = True
        self.owned.clear()
        return self.table

    def change(self, child_lc: str, name_lc: str, data: RegData | None) -> bool:
        stored = self.names.get(child_lc)
        if stored is None:
            return False
        table = self.table
        if self.shared:
            table = self.table = dict(table)
            self.shared = False
        if stored in self.owned:
            values = table[stored]
        else:
            values = table[stored] = dict(table[stored])
            self.owned.add(stored)
        if data is None:
            values.pop(name_lc, None)
        else:
            values[name_lc] = data
        return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id        INTEGER PRIMARY KEY,
    path_lc   TEXT NOT NULL UNIQUE,
    path      TEXT NOT NULL,
    parent_lc TEXT
);
CREATE INDEX IF NOT EXISTS keys_parent ON keys(parent_lc);
CREATE TABLE IF NOT EXISTS "values" (
    key_id  INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    name_lc TEXT NOT NULL,
    name    TEXT NOT NULL,
    type    INTEGER NOT NULL,
    data,
    PRIMARY KEY (key_id, name_lc)
) WITHOUT ROWID;
"""
