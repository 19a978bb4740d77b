"""The registry's in-transaction cache and lazy savepoints never show a stale or undone value.

The store answers repeated reads inside a transaction from memory and keeps that memory across
transactions while `PRAGMA data_version` says no other connection committed (see
agent/registry.py). These tests hold it to the same answers SQLite gives: a dict model driven
through nested savepoints, rollbacks and a second connection writing between transactions.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.errors import NotFoundError
from agent.registry import Registry, RegType, Rollback, fold


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = Registry(tmp_path / "reg.db")
    yield r
    r.close()


def statements(reg: Registry) -> list[str]:
    seen: list[str] = []
    reg._conn.set_trace_callback(seen.append)
    return seen


def test_another_connection_s_commit_is_seen_by_the_next_transaction(reg: Registry) -> None:
    other = Registry(reg.path)
    try:
        with reg.transaction():
            reg.set_sz(r"HKLM\K", "v", "mine")
            assert reg.query(r"HKLM\K", "v") == "mine"
            assert reg.query(r"HKLM\K", "w") is None  # cached as missing
        other.set_sz(r"HKLM\K", "v", "theirs")
        other.set_sz(r"HKLM\K", "w", "new")
        other.create_key(r"HKLM\K\Sub")
        with reg.transaction():
            assert reg.query(r"HKLM\K", "v") == "theirs"
            assert reg.query(r"HKLM\K", "w") == "new"
            assert reg.subkeys(r"HKLM\K") == ["Sub"]
        other.delete_key(r"HKLM\K")
        with reg.transaction():
            assert not reg.key_exists(r"HKLM\K")
            assert reg.query(r"HKLM\K", "v") is None
    finally:
        other.close()


def test_a_rolled_back_savepoint_leaves_no_cached_value(reg: Registry) -> None:
    reg.set_sz(r"HKLM\K", "v", "1")
    with reg.transaction():
        assert reg.query(r"HKLM\K", "v") == "1"
        with reg.transaction():
            reg.set_sz(r"HKLM\K", "v", "2")
            reg.set_sz(r"HKLM\K\New", "x", "y")
            assert reg.query(r"HKLM\K", "v") == "2"
            raise Rollback
        assert reg.query(r"HKLM\K", "v") == "1"
        assert not reg.key_exists(r"HKLM\K\New")
        assert reg.subkeys(r"HKLM\K") == []
        assert reg.subkey_values("HKLM") == {"K": {"V": "1"}}


def test_nested_blocks_that_only_read_cost_no_sql(reg: Registry) -> None:
    reg.set_sz(r"HKLM\K", "v", "1")
    with reg.transaction():
        reg.query(r"HKLM\K", "v")
        seen = statements(reg)
        for _ in range(3):
            with reg.transaction():
                assert reg.query(r"HKLM\K", "v") == "1"
        with reg.transaction():
            reg.query(r"HKLM\K", "nope")
            raise Rollback
        # one lookup of the value never read before; no SAVEPOINT, RELEASE or ROLLBACK TO
        assert [s.split()[0] for s in seen] == ["SELECT"]
        with reg.transaction():
            reg.set_sz(r"HKLM\K", "v", "2")
        # one write of a value the cache knows: its undo is kept in memory, no SAVEPOINT
        # (test_registry_undo.py checks when a savepoint is still opened)
        assert [s.split()[0] for s in seen[1:]] == ["INSERT"]


def test_subkey_values_reads_a_table_of_keys_and_follows_writes(reg: Registry) -> None:
    base = r"HKLM\Nodes"
    reg.set_sz(rf"{base}\2", "NodeURI", "./b")
    reg.set_value(rf"{base}\1", "Multi", RegType.REG_MULTI_SZ, ("a", "b"))
    reg.create_key(rf"{base}\3")
    expected = {"1": {"MULTI": ("a", "b")}, "2": {"NODEURI": "./b"}, "3": {}}
    assert reg.subkey_values(base) == expected
    with reg.transaction():
        earlier = reg.subkey_values(base)
        assert earlier == expected
        reg.set_dword(rf"{base}\3", "n", 7)
        assert reg.subkey_values(base)["3"] == {"N": 7}
        assert earlier == expected  # what was handed out does not change under the caller
        reg.delete_value(rf"{base}\2", "nodeuri")
        assert reg.subkey_values(base)["2"] == {}
        reg.create_key(rf"{base}\0")
        assert list(reg.subkey_values(base)) == ["0", "1", "2", "3"]
        reg.delete_key(rf"{base}\1")
        assert list(reg.subkey_values(base)) == ["0", "2", "3"]
    with pytest.raises(NotFoundError):
        reg.subkey_values(r"HKLM\Missing")


def test_a_failed_commit_rolls_back_and_leaves_the_store_usable(reg: Registry) -> None:
    reg.set_sz(r"HKLM\K", "v", "1")
    # A deferred foreign key makes COMMIT itself fail (SQLite checks it at commit time).
    reg._conn.execute("CREATE TABLE IF NOT EXISTS parent(id INTEGER PRIMARY KEY)")
    reg._conn.execute("CREATE TABLE IF NOT EXISTS child(p REFERENCES parent(id) "
                      "DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(Exception, match="FOREIGN KEY"), reg.transaction():
        reg.set_sz(r"HKLM\K", "v", "2")
        reg._conn.execute("INSERT INTO child VALUES (42)")
    assert not reg.in_transaction
    assert reg.query(r"HKLM\K", "v") == "1"
    with reg.transaction():
        assert reg.query(r"HKLM\K", "v") == "1"
        reg.set_sz(r"HKLM\K", "v", "3")
    assert reg.query(r"HKLM\K", "v") == "3"


# --- model-based check: transactions, savepoints, a second writer ------------------------------

NAMES = st.sampled_from(["a", "A", "b", "Key", "kEY", "ß"])
KEYS = st.lists(NAMES, min_size=1, max_size=3).map(lambda p: "HKLM\\" + "\\".join(p))
VALUE_NAMES = st.sampled_from(["", "v", "V", "w"])
DATA = st.one_of(
    st.tuples(st.just(RegType.REG_SZ), st.text(max_size=4)),
    st.tuples(st.just(RegType.REG_DWORD), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(RegType.REG_QWORD), st.integers(0, 2**64 - 1)),
)

State = tuple[set[str], dict[tuple[str, str], tuple[RegType, object]]]


class CachedRegistryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        path = Path(self._dir.name) / "m.db"
        self.reg = Registry(path)
        self.other = Registry(path)  # another process's connection
        self.keys: set[str] = {"HKLM", "HKU"}
        self.values: dict[tuple[str, str], tuple[RegType, object]] = {}
        self.open: list[tuple[AbstractContextManager[None], State]] = []

    # --- transactions ---------------------------------------------------------------------

    @precondition(lambda self: len(self.open) < 4)
    @rule()
    def begin(self) -> None:
        block = self.reg.transaction()
        block.__enter__()
        self.open.append((block, (set(self.keys), copy.deepcopy(self.values))))

    @precondition(lambda self: bool(self.open))
    @rule()
    def end(self) -> None:
        block, _ = self.open.pop()
        block.__exit__(None, None, None)

    @precondition(lambda self: bool(self.open))
    @rule()
    def roll_back(self) -> None:
        block, (keys, values) = self.open.pop()
        assert block.__exit__(Rollback, Rollback(), None)
        self.keys, self.values = keys, values

    @precondition(lambda self: not self.open)  # it would wait for our write lock
    @rule(key=KEYS, name=VALUE_NAMES, data=DATA)
    def other_connection_writes(self, key: str, name: str,
                                data: tuple[RegType, object]) -> None:
        self.other.set_value(key, name, data[0], data[1])  # type: ignore[arg-type]
        self._ensure(key)
        self.values[(fold(key), fold(name))] = data

    @precondition(lambda self: not self.open)
    @rule(key=KEYS)
    def other_connection_deletes(self, key: str) -> None:
        self.other.delete_key(key)
        self._forget(key)

    # --- writes -----------------------------------------------------------------------------

    @rule(key=KEYS, name=VALUE_NAMES, data=DATA)
    def set_value(self, key: str, name: str, data: tuple[RegType, object]) -> None:
        self.reg.set_value(key, name, data[0], data[1])  # type: ignore[arg-type]
        self._ensure(key)
        self.values[(fold(key), fold(name))] = data

    @rule(key=KEYS)
    def create(self, key: str) -> None:
        self.reg.create_key(key)
        self._ensure(key)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.reg.delete_key(key) == (fold(key) in self.keys)
        self._forget(key)

    @rule(key=KEYS, name=VALUE_NAMES)
    def delete_value(self, key: str, name: str) -> None:
        existed = self.reg.delete_value(key, name)
        assert existed == ((fold(key), fold(name)) in self.values)
        self.values.pop((fold(key), fold(name)), None)

    # --- reads (through the cache when a transaction is open) ------------------------------

    @rule(key=KEYS, name=VALUE_NAMES)
    def read(self, key: str, name: str) -> None:
        expected = self.values.get((fold(key), fold(name)))
        assert self.reg.query(key, name) == (None if expected is None else expected[1])
        assert self.reg.key_exists(key) == (fold(key) in self.keys)

    @invariant()
    def matches_model(self) -> None:
        for (k, n), (t, d) in self.values.items():
            assert self.reg.query(k, n) == d
            assert self.reg.get_value(k, n).type == t
        for key in self.keys:
            if key == "HKU":
                continue
            children = {c for c in self.keys if c.rpartition("\\")[0] == key}
            assert {fold(f"{key}\\{s}") for s in self.reg.subkeys(key)} == children
            table = self.reg.subkey_values(key)
            assert {fold(f"{key}\\{s}") for s in table} == children
            for sub, vals in table.items():
                child = fold(f"{key}\\{sub}")
                assert dict(vals) == {n: d for (k, n), (_, d) in self.values.items()
                                      if k == child}

    def _ensure(self, key: str) -> None:
        parts = fold(key).split("\\")
        for i in range(1, len(parts) + 1):
            self.keys.add("\\".join(parts[:i]))

    def _forget(self, key: str) -> None:
        k = fold(key)
        self.keys = {x for x in self.keys if x != k and not x.startswith(k + "\\")}
        self.values = {kv: d for kv, d in self.values.items()
                       if kv[0] != k and not kv[0].startswith(k + "\\")}

    def teardown(self) -> None:
        while self.open:
            self.open.pop()[0].__exit__(Rollback, Rollback(), None)
        self.reg.close()
        self.other.close()
        self._dir.cleanup()


CachedRegistryModel.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCachedRegistryModel = CachedRegistryModel.TestCase
