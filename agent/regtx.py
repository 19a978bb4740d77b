"""The registry's transactions (part of `agent.registry`): blocks, savepoints, one-write undo.

`transaction()` is all-or-nothing and nests: the outermost block is `BEGIN IMMEDIATE` ...
`COMMIT`, nested ones are savepoints (a SyncML Atomic is one, each DM command another).
Savepoints are opened lazily, right before the first write inside them: a nested block that
only reads has nothing to undo, so it costs no SQL at all. A block whose first write is one
value row whose previous state the cache knows (a Replace of a value the CSP just read) does
not open its savepoint for it either: it keeps that previous row instead, and undoes the one
statement itself if the block fails (SQLite runs each statement all-or-nothing); a second
write in the block opens the savepoint then, and a failure undoes both. So a DM command that
writes one value costs one statement, not three.

`Transactions` is a mixin of `Registry`, which owns the connection, the lock and the caches.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Final

from agent.errors import LocalError
from agent.regvalues import RegType, Row

__all__ = ["UNKNOWN", "UPSERT", "Rollback", "Transactions"]


class Rollback(Exception):
    """Raise inside `Registry.transaction()` to undo it without propagating an error."""


UPSERT: Final = ('INSERT INTO "values"(key_id, name_lc, name, type, data) VALUES (?, ?, ?, ?, ?) '
                 "ON CONFLICT(key_id, name_lc) DO UPDATE SET name=excluded.name, "
                 "type=excluded.type, data=excluded.data")
UNKNOWN: Final = ("", RegType.REG_NONE, b"")  # a row that is never cached: "not looked up"


class Transactions:
    """Transaction state and statements of a `Registry` (see the module docstring)."""

    # Set by Registry.__init__:
    _lock: threading.RLock
    _conn: sqlite3.Connection
    _cur: sqlite3.Cursor
    _rows: dict[tuple[int, str], Row | None]  # the value cache (key id, folded name) -> row

    def _init_transactions(self) -> None:
        self._depth = 0
        # Open blocks: the outermost transaction and `_depth - 1` nested ones, the n-th nested
        # one (from 0) being savepoint `sp{n+1}`. The first `_materialized` of those exist in
        # SQLite; the others had no write yet.
        self._materialized = 0
        # The block whose first write ran before its savepoint existed (see the module
        # docstring): (block index, key id, folded value name, the row before that write).
        self._soft: tuple[int, int, str, Row | None] | None = None
        self._writes = 0  # write statements issued on this connection, ever
        self._cache_live = False  # the registry's caches are valid (inside a transaction)
        self._data_version: int | None = None
        self._blocks = _Blocks(self)  # what transaction() returns

    def _drop_cache(self) -> None:
        """Forget the registry's caches (after a rollback that undid writes)."""
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[None]:
        """All-or-nothing block; nests through savepoints. Raise `Rollback` to undo quietly."""
        return self._blocks

    def begin_nested(self) -> int:
        """`with transaction():` inside the transaction this thread has open, as two calls
        (the DM executor opens one block per command; a `with` costs more than the block).
        Returns the token for `end_nested`, which must follow in every case, blocks closing
        in the reverse order of opening."""
        self._lock.acquire()
        if not self._depth:
            self._lock.release()
            raise LocalError("begin_nested() outside a transaction")
        self._depth += 1
        return self._writes

    def end_nested(self, token: int, exc: BaseException | None) -> bool:
        """Close the block `begin_nested` opened: kept when `exc` is None, undone otherwise.
        True when `exc` is a `Rollback` (to swallow, as `with transaction():` does)."""
        try:
            index = self._depth - 2
            if exc is None and index >= self._materialized:  # as _Blocks.__exit__ inlines it
                soft = self._soft
                if soft is not None and soft[0] == index:
                    self._soft = None
                self._depth -= 1
            else:
                self._exit_savepoint(index, exc is None, token)
        finally:
            self._lock.release()
        return isinstance(exc, Rollback)

    def _begin(self) -> None:
        self._cur.execute("BEGIN IMMEDIATE")
        try:
            # We hold the write lock now: the cache is good for the whole transaction, and
            # still good from the last one unless another connection committed since.
            version = self._cur.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        if version != self._data_version:
            self._drop_cache()
            self._data_version = version
        self._depth = 1
        self._cache_live = True

    def _end(self, commit: bool, writes: int) -> None:
        """Commit or roll back the outermost transaction; the store is idle afterwards."""
        try:
            if not commit:
                self._rollback(writes)
                return
            try:
                self._cur.execute("COMMIT")
            except BaseException:
                self._rollback(writes)  # a failed COMMIT leaves the transaction open
                raise
        finally:
            self._depth = 0
            self._cache_live = False
            self._materialized = 0
            self._soft = None

    def _rollback(self, writes: int) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            if self._writes != writes:
                self._drop_cache()

    def _exit_savepoint(self, index: int, commit: bool, writes: int) -> None:
        try:
            soft = self._soft
            if soft is not None and soft[0] == index:
                self._soft = None  # this block's; committed, it is part of the parent's now
            else:
                soft = None
            if index < self._materialized:  # else no savepoint was needed: no SQL here
                try:
                    if commit:
                        self._cur.execute(_savepoint_sql("RELEASE", index))
                    else:
                        self._cur.execute(_savepoint_sql("ROLLBACK TO", index))
                        self._cur.execute(_savepoint_sql("RELEASE", index))
                finally:
                    self._materialized = index
                    if not commit and self._writes != writes:
                        self._drop_cache()
            if soft is not None and not commit:
                # The write made before the savepoint (if any) was opened: undo it last.
                try:
                    self._undo(soft[1], soft[2], soft[3])
                finally:
                    self._drop_cache()
        finally:
            self._depth -= 1

    def _undo(self, key_id: int, name_lc: str, before: Row | None) -> None:
        if before is None:
            self._cur.execute('DELETE FROM "values" WHERE key_id = ? AND name_lc = ?',
                              (key_id, name_lc))
        else:
            self._cur.execute(UPSERT, (key_id, name_lc, before[0], int(before[1]), before[2]))

    def _write(self, sql: str, args: tuple[object, ...]) -> sqlite3.Cursor:
        """Every write statement goes through here: open the pending savepoints first."""
        self._writes += 1
        while self._materialized < self._depth - 1:
            self._cur.execute(_savepoint_sql("SAVEPOINT", self._materialized))
            self._materialized += 1
        return self._cur.execute(sql, args)

    def _write_value(self, sql: str, args: tuple[object, ...], key_id: int,
                     name_lc: str) -> sqlite3.Cursor:
        """A write of the one row (key_id, name_lc): `_write`, except when it is the first
        write of the innermost block, every enclosing block already has its savepoint, and
        the cache knows the row's current state. Then the block's savepoint is not opened: the
        block records that state and `_exit_savepoint` restores it if the block fails. A
        statement is atomic by itself, so the undo covers exactly what it did."""
        if self._soft is None and self._materialized == self._depth - 2 and self._cache_live:
            before = self._rows.get((key_id, name_lc), UNKNOWN)
            if before is not UNKNOWN:
                self._writes += 1
                cur = self._cur.execute(sql, args)
                self._soft = (self._materialized, key_id, name_lc, before)
                return cur
        return self._write(sql, args)

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

_SAVEPOINT_SQL: Final = {verb: tuple(f"{verb} sp{n + 1}" for n in range(32))
                          for verb in ("SAVEPOINT", "RELEASE", "ROLLBACK TO")}


def _savepoint_sql(verb: str, index: int) -> str:
    names = _SAVEPOINT_SQL[verb]
    return names[index] if index < len(names) else f"{verb} sp{index + 1}"


class _Blocks:
    """What `Registry.transaction()` returns: the outermost block is BEGIN IMMEDIATE ...
    COMMIT, nested ones are (lazy) savepoints. `__exit__` swallows `Rollback` only.

    One object per registry, entered once per block: the open blocks are a stack of (savepoint
    index, -1 for the outermost; write count at entry). The stack is only touched while the
    registry lock is held, and the lock is held from a block's `__enter__` to its `__exit__`,
    so the thread that has it is the only one using the stack. A class rather than a
    generator-based context manager, and no object per block: one is entered per DM command."""

    __slots__ = ("_reg", "_stack")

    def __init__(self, reg: Transactions) -> None:
        self._reg = reg
        self._stack: list[tuple[int, int]] = []

    def __enter__(self) -> None:
        reg = self._reg
        reg._lock.acquire()
        if reg._depth:
            # a nested block: savepoint sp{index + 1}, opened lazily
            self._stack.append((reg._depth - 1, reg._writes))
            reg._depth += 1
            return
        try:
            reg._begin()
        except BaseException:
            reg._lock.release()
            raise
        self._stack.append((-1, reg._writes))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        reg = self._reg
        index, writes = self._stack.pop()
        try:
            if index < 0:
                reg._end(exc_type is None, writes)
            elif exc_type is None and index >= reg._materialized:
                # _exit_savepoint's commit without a savepoint to release, inline: the common
                # case of a DM command (nothing written, or one write undone in memory)
                soft = reg._soft
                if soft is not None and soft[0] == index:
                    reg._soft = None
                reg._depth -= 1
            else:
                reg._exit_savepoint(index, exc_type is None, writes)
        finally:
            reg._lock.release()
        return exc_type is not None and issubclass(exc_type, Rollback)


