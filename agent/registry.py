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
"""

from __future__ import annotations

import enum
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import LocalError, NotFoundError

MAX_KEY_NAME: Final = 255
MAX_VALUE_NAME: Final = 16383

_ROOT_ALIASES: Final = {
    "HKLM": "HKLM", "HKEY_LOCAL_MACHINE": "HKLM",
    "HKU": "HKU", "HKEY_USERS": "HKU",
}
_CURRENT_USER_ALIASES: Final = ("HKCU", "HKEY_CURRENT_USER")
ROOT_LONG_NAMES: Final = {"HKLM": "HKEY_LOCAL_MACHINE", "HKU": "HKEY_USERS"}


class RegType(enum.IntEnum):
    """Value types, numbered as in winnt.h."""

    REG_NONE = 0
    REG_SZ = 1
    REG_EXPAND_SZ = 2
    REG_BINARY = 3
    REG_DWORD = 4
    REG_MULTI_SZ = 7
    REG_QWORD = 11


RegData = str | int | bytes | tuple[str, ...]


@dataclass(frozen=True)
class RegValue:
    name: str  # "" is the key's default value
    type: RegType
    data: RegData


class Rollback(Exception):
    """Raise inside `Registry.transaction()` to undo it without propagating an error."""


def fold(name: str) -> str:
    """Case folding the way the registry compares names: per character upper-casing that never
    changes the length (Windows upper-cases 'ß' to itself, Python to 'SS')."""
    if name.isascii():
        return name.upper()
    return "".join(u if len(u := c.upper()) == 1 else c for c in name)


class Registry:
    """One device's registry store. Thread-safe; share one instance per process and device."""

    def __init__(self, path: Path, *, current_user_sid: str | None = None,
                 busy_timeout: float = 30.0) -> None:
        self.path = path
        self.current_user_sid = current_user_sid
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                     check_same_thread=False)
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

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing block; nests through savepoints. Raise `Rollback` to undo quietly."""
        with self._lock:
            if self._depth == 0:
                self._conn.execute("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield
                except Rollback:
                    self._conn.execute("ROLLBACK")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                else:
                    self._conn.execute("COMMIT")
                finally:
                    self._depth = 0
            else:
                name = f"sp{self._depth}"
                self._conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield
                except Rollback:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                except BaseException:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                    raise
                else:
                    self._conn.execute(f"RELEASE {name}")
                finally:
                    self._depth -= 1

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    # --- keys --------------------------------------------------------------------------------

    def create_key(self, path: str) -> str:
        """Create the key and any missing parents; return its canonical path."""
        canon = self.normalize(path)
        with self.transaction():
            self._ensure_key(canon)
        return canon

    def key_exists(self, path: str) -> bool:
        with self._lock:
            return self._key_id(self.normalize(path)) is not None

    def delete_key(self, path: str) -> bool:
        """Delete the key with its subtree. Roots and hive roots (HKU\\<SID>) stay deletable
        only below. Returns False when the key did not exist."""
        canon = self.normalize(path)
        if "\\" not in canon:
            raise LocalError(f"cannot delete the root key {canon}")
        lc = fold(canon)
        with self.transaction():
            cur = self._conn.execute(
                "DELETE FROM keys WHERE path_lc = ? OR (path_lc > ? AND path_lc < ?)",
                (lc, lc + "\\", lc + "]"))  # ']' sorts right after '\\': the subtree range
            return cur.rowcount > 0

    def subkeys(self, path: str) -> list[str]:
        """Names of the direct subkeys, in stored case, sorted case-insensitively."""
        canon = self.normalize(path)
        with self._lock:
            self._require_key(canon)
            rows = self._conn.execute(
                "SELECT path FROM keys WHERE parent_lc = ? ORDER BY path_lc", (fold(canon),))
            return [r[0].rsplit("\\", 1)[1] for r in rows]

    def key_path(self, path: str) -> str:
        """The stored-case canonical path of an existing key."""
        canon = self.normalize(path)
        with self._lock:
            row = self._conn.execute("SELECT path FROM keys WHERE path_lc = ?",
                                     (fold(canon),)).fetchone()
        if row is None:
            raise NotFoundError(f"registry key not found: {canon}")
        return str(row[0])

    def walk(self, path: str) -> Iterator[tuple[str, list[RegValue]]]:
        """Depth-first (key path, values) for the key and its subtree, children sorted."""
        canon = self.normalize(path)
        lc = fold(canon)
        with self._lock:
            self._require_key(canon)
            rows = self._conn.execute(
                "SELECT id, path, path_lc FROM keys WHERE path_lc = ? "
                "OR (path_lc > ? AND path_lc < ?)", (lc, lc + "\\", lc + "]")).fetchall()
            rows.sort(key=lambda r: r[2].split("\\"))
            result = [(r[1], self._values_of(r[0])) for r in rows]
        yield from result

    # --- values ------------------------------------------------------------------------------

    def set_value(self, path: str, name: str, type_: RegType, data: RegData) -> None:
        """Write a value, creating the key (and its parents) when missing."""
        stored = _encode(type_, data)
        if len(name) > MAX_VALUE_NAME:
            raise LocalError(f"value name longer than {MAX_VALUE_NAME} characters")
        canon = self.normalize(path)
        with self.transaction():
            key_id = self._ensure_key(canon)
            self._conn.execute(
                'INSERT INTO "values"(key_id, name_lc, name, type, data) VALUES (?, ?, ?, ?, ?) '
                "ON CONFLICT(key_id, name_lc) DO UPDATE SET name=excluded.name, "
                "type=excluded.type, data=excluded.data",
                (key_id, fold(name), name, int(type_), stored))

    def set_sz(self, path: str, name: str, data: str) -> None:
        self.set_value(path, name, RegType.REG_SZ, data)

    def set_dword(self, path: str, name: str, data: int) -> None:
        self.set_value(path, name, RegType.REG_DWORD, data)

    def get_value(self, path: str, name: str) -> RegValue:
        """The value, or NotFoundError naming the key or the value that is missing."""
        canon = self.normalize(path)
        with self._lock:
            key_id = self._require_key(canon)
            row = self._conn.execute(
                'SELECT name, type, data FROM "values" WHERE key_id = ? AND name_lc = ?',
                (key_id, fold(name))).fetchone()
        if row is None:
            raise NotFoundError(f"registry value not found: {canon}\\{name or '(Default)'}")
        return _decode_row(row)

    def query(self, path: str, name: str) -> RegData | None:
        """The value's data, or None when the key or value is missing."""
        try:
            return self.get_value(path, name).data
        except NotFoundError:
            return None

    def values(self, path: str) -> list[RegValue]:
        canon = self.normalize(path)
        with self._lock:
            return self._values_of(self._require_key(canon))

    def delete_value(self, path: str, name: str) -> bool:
        canon = self.normalize(path)
        with self.transaction():
            key_id = self._key_id(canon)
            if key_id is None:
                return False
            cur = self._conn.execute('DELETE FROM "values" WHERE key_id = ? AND name_lc = ?',
                                     (key_id, fold(name)))
            return cur.rowcount > 0

    def integrity_check(self) -> str:
        with self._lock:
            return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])

    # --- internals ---------------------------------------------------------------------------

    def _key_id(self, canon: str) -> int | None:
        row = self._conn.execute("SELECT id FROM keys WHERE path_lc = ?",
                                 (fold(canon),)).fetchone()
        return None if row is None else int(row[0])

    def _require_key(self, canon: str) -> int:
        key_id = self._key_id(canon)
        if key_id is None:
            raise NotFoundError(f"registry key not found: {canon}")
        return key_id

    def _ensure_key(self, canon: str) -> int:
        key_id = self._key_id(canon)
        if key_id is not None:
            return key_id
        parent, _, _ = canon.rpartition("\\")
        self._ensure_key(parent)
        cur = self._conn.execute("INSERT INTO keys(path_lc, path, parent_lc) VALUES (?, ?, ?)",
                                 (fold(canon), canon, fold(parent)))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _values_of(self, key_id: int) -> list[RegValue]:
        rows = self._conn.execute(
            'SELECT name, type, data FROM "values" WHERE key_id = ? ORDER BY name_lc', (key_id,))
        return [_decode_row(r) for r in rows]


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

_INT_RANGE = {RegType.REG_DWORD: 0xFFFFFFFF, RegType.REG_QWORD: 0xFFFFFFFFFFFFFFFF}


def _encode(type_: RegType, data: RegData) -> str | int | bytes:
    """Validate data against its type and return what SQLite stores."""
    type_ = RegType(type_)
    if type_ in (RegType.REG_SZ, RegType.REG_EXPAND_SZ):
        if not isinstance(data, str):
            raise LocalError(f"{type_.name} needs a string, got {type(data).__name__}")
        return data
    if type_ in _INT_RANGE:
        if not isinstance(data, int) or isinstance(data, bool):
            raise LocalError(f"{type_.name} needs an integer, got {type(data).__name__}")
        limit = _INT_RANGE[type_]
        if not -(limit // 2 + 1) <= data <= limit:
            raise LocalError(f"{data} does not fit in {type_.name}")
        data &= limit  # negative (signed) input is stored as its two's complement
        if type_ is RegType.REG_QWORD and data >= 2**63:
            return data - 2**64  # SQLite integers are signed 64-bit; _decode_row undoes this
        return data
    if type_ in (RegType.REG_BINARY, RegType.REG_NONE):
        if not isinstance(data, bytes | bytearray):
            raise LocalError(f"{type_.name} needs bytes, got {type(data).__name__}")
        return bytes(data)
    if type_ is RegType.REG_MULTI_SZ:
        if isinstance(data, str) or not isinstance(data, tuple | list):
            raise LocalError("REG_MULTI_SZ needs a sequence of strings")
        if not all(isinstance(s, str) and s and "\0" not in s for s in data):
            raise LocalError("REG_MULTI_SZ entries must be non-empty strings without NUL")
        return "\0".join(data)
    raise LocalError(f"unsupported value type {type_!r}")


def _decode_row(row: tuple[str, int, str | int | bytes]) -> RegValue:
    name, type_num, raw = row
    type_ = RegType(type_num)
    data: RegData
    if type_ is RegType.REG_MULTI_SZ:
        assert isinstance(raw, str)
        data = tuple(raw.split("\0")) if raw else ()
    elif type_ is RegType.REG_QWORD:
        assert isinstance(raw, int)
        data = raw & 0xFFFFFFFFFFFFFFFF
    else:
        data = raw
    return RegValue(name, type_, data)
