"""A nested block whose first write is one value row the cache knows opens no savepoint for it:
it keeps the row's previous state and undoes that one statement itself when the block fails.

These tests hold that to what a savepoint gives: after a failed block the store (SQLite and the
cache) is exactly as before it, whatever the block did (one write, several, nested blocks,
deletes), and a block that succeeds leaves its writes to its parent's fate.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from agent.registry import Registry, RegType, Rollback
from tests.unit.test_registry_cache import KEYS, VALUE_NAMES, CachedRegistryModel

K = r"HKLM\K"


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = Registry(tmp_path / "reg.db")
    yield r
    r.close()


def statements(reg: Registry) -> list[str]:
    seen: list[str] = []
    reg._conn.set_trace_callback(lambda s: seen.append(s.split()[0]))
    return seen


def on_disk(reg: Registry) -> list[tuple[object, ...]]:
    """What another connection reads (nothing cached)."""
    with sqlite3.connect(reg.path) as conn:
        return sorted(conn.execute('SELECT k.path, v.name, v.type, v.data FROM keys k JOIN '
                                   '"values" v ON v.key_id = k.id'))


def test_a_failed_block_restores_the_value_and_its_stored_name(reg: Registry) -> None:
    reg.set_value(K, "Val", RegType.REG_DWORD, 7)
    before = on_disk(reg)
    with reg.transaction():
        assert reg.query(K, "val") == 7  # now cached: the write below needs no savepoint
        seen = statements(reg)
        with reg.transaction():
            reg.set_sz(K, "VAL", "other")
            assert reg.query(K, "val") == "other"
            raise Rollback
        assert seen == ["INSERT", "INSERT"]  # the write and its undo; no SAVEPOINT
        assert reg.query(K, "val") == 7
        assert [(v.name, v.type) for v in reg.values(K)] == [("Val", RegType.REG_DWORD)]
    assert on_disk(reg) == before


def test_a_failed_block_removes_a_value_known_to_be_missing(reg: Registry) -> None:
    reg.create_key(K)
    with reg.transaction():
        assert reg.query(K, "v") is None
        seen = statements(reg)
        with pytest.raises(RuntimeError), reg.transaction():
            reg.set_sz(K, "v", "new")
            raise RuntimeError("CSP bug")
        assert seen == ["INSERT", "DELETE"]
        assert reg.query(K, "v") is None
        assert reg.subkey_values("HKLM") == {"K": {}}
    assert on_disk(reg) == []


def test_a_failed_block_restores_a_deleted_value(reg: Registry) -> None:
    reg.set_value(K, "m", RegType.REG_MULTI_SZ, ("a", "b"))
    before = on_disk(reg)
    with reg.transaction():
        assert reg.query(K, "m") == ("a", "b")
        with reg.transaction():
            assert reg.delete_value(K, "m")
            assert reg.query(K, "m") is None
            raise Rollback
        assert reg.query(K, "m") == ("a", "b")
    assert on_disk(reg) == before


def test_a_second_write_opens_the_savepoint_and_a_failure_undoes_both(reg: Registry) -> None:
    reg.set_sz(K, "a", "1")
    reg.set_sz(K, "b", "2")
    before = on_disk(reg)
    with reg.transaction():
        reg.query(K, "a")
        seen = statements(reg)
        with reg.transaction():
            reg.set_sz(K, "a", "10")
            reg.set_sz(K, "b", "20")  # b was not read: its write needs the savepoint anyway
            reg.set_sz(rf"{K}\New", "c", "3")
            raise Rollback
        assert seen[:3] == ["INSERT", "SAVEPOINT", "INSERT"]
        assert seen[-3:] == ["ROLLBACK", "RELEASE", "INSERT"]  # then the first write's undo
        assert (reg.query(K, "a"), reg.query(K, "b")) == ("1", "2")
        assert not reg.key_exists(rf"{K}\New")
    assert on_disk(reg) == before


def test_nested_blocks_inside_a_block_that_fails_are_undone_with_it(reg: Registry) -> None:
    reg.set_sz(K, "a", "1")
    before = on_disk(reg)
    with reg.transaction():
        reg.query(K, "a")
        reg.query(K, "b")
        with reg.transaction():
            reg.set_sz(K, "a", "10")
            with reg.transaction():  # succeeds: its write is part of the failing block's
                reg.set_sz(K, "b", "20")
            with reg.transaction():  # fails on its own
                reg.set_sz(K, "a", "100")
                raise Rollback
            assert (reg.query(K, "a"), reg.query(K, "b")) == ("10", "20")
            raise Rollback
        assert (reg.query(K, "a"), reg.query(K, "b")) == ("1", None)
    assert on_disk(reg) == before


def test_a_block_that_succeeds_belongs_to_its_parent(reg: Registry) -> None:
    reg.set_sz(K, "a", "1")
    with reg.transaction():
        reg.query(K, "a")
        with reg.transaction():  # a parent savepoint, opened by its first write
            reg.set_sz(K, "z", "0")
            with reg.transaction():
                reg.set_sz(K, "a", "2")  # one known value: no savepoint of its own
            assert reg.query(K, "a") == "2"
            raise Rollback  # the parent fails: its savepoint undoes the child's write too
        assert reg.query(K, "a") == "1"
        with reg.transaction():
            reg.set_sz(K, "a", "3")
    assert reg.query(K, "a") == "3"
    assert on_disk(reg) == [(K, "a", RegType.REG_SZ.value, "3")]


def test_an_outer_rollback_undoes_blocks_that_succeeded(reg: Registry) -> None:
    reg.set_sz(K, "a", "1")
    before = on_disk(reg)
    with reg.transaction():
        reg.query(K, "a")
        for data in ("2", "3"):
            with reg.transaction():
                reg.set_sz(K, "a", data)
        raise Rollback
    assert reg.query(K, "a") == "1"
    assert on_disk(reg) == before


def test_an_unknown_previous_state_opens_the_savepoint_as_before(reg: Registry) -> None:
    with Registry(reg.path) as other:  # another connection's commit: reg's cache is dropped
        other.set_sz(K, "a", "1")
    with reg.transaction():
        seen = statements(reg)
        with reg.transaction():
            reg.set_sz(K, "a", "2")  # a value this transaction never read
            raise Rollback
        assert seen[-4:] == ["SAVEPOINT", "INSERT", "ROLLBACK", "RELEASE"]
        assert reg.query(K, "a") == "1"


class UndoRegistryModel(CachedRegistryModel):
    """The cached-registry model with writes that read first (so the cache knows the previous
    state and blocks take the no-savepoint path) next to the plain ones."""

    @rule(key=KEYS, name=VALUE_NAMES, text=VALUE_NAMES)
    def read_then_set(self, key: str, name: str, text: str) -> None:
        self.read(key, name)
        self.set_value(key, name, (RegType.REG_SZ, text))

    @rule(key=KEYS, name=VALUE_NAMES)
    def read_then_delete(self, key: str, name: str) -> None:
        self.read(key, name)
        self.delete_value(key, name)

    @rule(key=KEYS, name=VALUE_NAMES, text=VALUE_NAMES, writes=st.integers(1, 3),
          fail=st.booleans())
    def command(self, key: str, name: str, text: str, writes: int, fail: bool) -> None:
        """What the DM executor does per command: a block that reads a value, writes it
        (maybe more), and fails or not; inside the batch's transaction when none is open."""
        batch = not self.open
        if batch:
            self.begin()
        self.create(key)  # (in the enclosing block) the CSP reads a value of an existing key
        self.begin()
        self.read(key, name)
        for n in range(writes):
            self.set_value(key if n < 2 else f"{key}\\X", name, (RegType.REG_SZ, text + str(n)))
        if fail:
            self.roll_back()
        else:
            self.end()
        if batch:
            self.end()


UndoRegistryModel.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestUndoRegistryModel = UndoRegistryModel.TestCase


def test_threads_sharing_one_registry_keep_their_own_blocks(reg: Registry) -> None:
    """transaction() hands every caller the same block object; its stack of open blocks is
    only used under the registry lock, which a thread holds from __enter__ to __exit__."""
    import threading

    def worker() -> None:
        for _ in range(25):
            with reg.transaction():
                n = reg.query(K, "n") or 0
                assert isinstance(n, int)
                with reg.transaction():
                    reg.set_dword(K, "n", n + 1)
                with reg.transaction():  # fails: undone, whatever the other threads do
                    reg.set_dword(K, "n", 10**6)
                    reg.set_sz(K, "junk", "x")
                    raise Rollback

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.query(K, "n") == 100
    assert reg.query(K, "junk") is None
    assert not reg.in_transaction


def test_tables_handed_out_never_change_while_the_cache_follows_writes(reg: Registry) -> None:
    """subkey_values() copies its cached table once after a hand-out and each subkey's values
    once; later writes change those copies in place, never what a caller holds."""
    base = r"HKLM\Nodes"
    for n in ("1", "2"):
        reg.set_sz(rf"{base}\{n}", "NodeURI", f"./{n}")
    with reg.transaction():
        first = reg.subkey_values(base)
        snapshot_first = {k: dict(v) for k, v in first.items()}
        reg.set_sz(rf"{base}\1", "ExpectedValue", "a")
        reg.set_sz(rf"{base}\1", "ExpectedValue", "b")  # in place: the cache's own copy now
        reg.set_sz(rf"{base}\2", "ExpectedValue", "c")
        assert first == snapshot_first
        second = reg.subkey_values(base)
        assert second == {"1": {"NODEURI": "./1", "EXPECTEDVALUE": "b"},
                          "2": {"NODEURI": "./2", "EXPECTEDVALUE": "c"}}
        reg.delete_value(rf"{base}\1", "ExpectedValue")
        reg.set_sz(rf"{base}\2", "ExpectedValue", "d")
        assert second == {"1": {"NODEURI": "./1", "EXPECTEDVALUE": "b"},
                          "2": {"NODEURI": "./2", "EXPECTEDVALUE": "c"}}
        assert reg.subkey_values(base) == {"1": {"NODEURI": "./1"},
                                           "2": {"NODEURI": "./2", "EXPECTEDVALUE": "d"}}
        assert first == snapshot_first


def test_begin_and_end_nested_are_a_nested_with_block(reg: Registry) -> None:
    """The executor's per-command block as two calls: kept, undone, Rollback swallowed."""
    from agent.errors import LocalError

    with pytest.raises(LocalError):
        reg.begin_nested()  # only inside a transaction
    assert not reg._lock._is_owned()  # type: ignore[attr-defined]
    reg.set_sz(K, "a", "1")
    with reg.transaction():
        reg.query(K, "a")
        token = reg.begin_nested()
        reg.set_sz(K, "a", "2")
        assert reg.end_nested(token, None) is False  # kept
        token = reg.begin_nested()
        reg.set_sz(K, "a", "3")
        reg.set_sz(K, "b", "x")
        assert reg.end_nested(token, RuntimeError("CSP bug")) is False  # undone, not swallowed
        assert (reg.query(K, "a"), reg.query(K, "b")) == ("2", None)
        token = reg.begin_nested()
        reg.set_sz(K, "a", "4")
        assert reg.end_nested(token, Rollback()) is True  # undone and swallowed
        assert reg.query(K, "a") == "2"
    assert reg.query(K, "a") == "2" and not reg.in_transaction
