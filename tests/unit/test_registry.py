"""The registry store: Windows key semantics, typed values, transactions, a dict model check."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.errors import LocalError, NotFoundError
from agent.registry import Registry, RegType, RegValue, Rollback, fold

SCEP = r"HKLM\Software\Microsoft\SCEP\MS DM Server"


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "reg.db", current_user_sid="S-1-12-1-1-2-3-4")
    yield r
    r.close()


def test_create_intermediate_keys_and_keep_case(reg: Registry) -> None:
    reg.set_sz(SCEP + r"\Uid1\Install", "ServerURL", "https://ndes/")
    assert reg.key_exists(r"hklm\SOFTWARE\microsoft\scep")
    assert reg.subkeys(r"HKLM\Software\Microsoft\SCEP") == ["MS DM Server"]
    assert reg.key_path(r"hklm\software\microsoft\scep\ms dm server\UID1") == SCEP + r"\Uid1"


def test_values_are_case_insensitive_and_typed(reg: Registry) -> None:
    key = SCEP + r"\U"
    reg.set_value(key, "Status", RegType.REG_DWORD, 16)
    reg.set_value(key, "ErrorCode", RegType.REG_DWORD, -2145844844)  # signed input accepted
    reg.set_value(key, "Q", RegType.REG_QWORD, 2**63)
    reg.set_value(key, "Blob", RegType.REG_BINARY, b"\x00\xff")
    reg.set_value(key, "Multi", RegType.REG_MULTI_SZ, ("a", "b c"))
    reg.set_value(key, "", RegType.REG_SZ, "default")
    assert reg.get_value(key, "STATUS") == RegValue("Status", RegType.REG_DWORD, 16)
    assert reg.query(key, "errorcode") == 0x80190194
    assert reg.query(key, "q") == 2**63
    assert reg.query(key, "blob") == b"\x00\xff"
    assert reg.query(key, "multi") == ("a", "b c")
    assert reg.query(key, "") == "default"
    # Rewriting with other case keeps one value and takes the new name's case.
    reg.set_value(key, "STATUS", RegType.REG_DWORD, 1)
    names = [v.name for v in reg.values(key)]
    assert names.count("STATUS") == 1 and "Status" not in names


@pytest.mark.parametrize(("type_", "data"), [
    (RegType.REG_DWORD, 2**32),
    (RegType.REG_DWORD, "1"),
    (RegType.REG_DWORD, True),
    (RegType.REG_QWORD, 2**64),
    (RegType.REG_SZ, b"bytes"),
    (RegType.REG_BINARY, "text"),
    (RegType.REG_MULTI_SZ, "not a list"),
    (RegType.REG_MULTI_SZ, ("ok", "")),
    (RegType.REG_MULTI_SZ, ("nul\0inside",)),
])
def test_type_validation(reg: Registry, type_: RegType, data: object) -> None:
    with pytest.raises(LocalError):
        reg.set_value(r"HKLM\K", "v", type_, data)  # type: ignore[arg-type]
    assert not reg.key_exists(r"HKLM\K")  # a refused write creates nothing


@pytest.mark.parametrize("path", ["", "HKXX\\a", "HKLM\\a\\\\b", "HKLM\\" + "x" * 256])
def test_invalid_paths(reg: Registry, path: str) -> None:
    with pytest.raises(LocalError):
        reg.create_key(path)


def test_hkcu_resolves_to_the_user_hive(reg: Registry) -> None:
    reg.set_sz(r"HKCU\Software\Microsoft\SCEP\P\U\Install", "SubjectName", "CN=me")
    assert reg.query(r"HKU\S-1-12-1-1-2-3-4\Software\Microsoft\SCEP\P\U\Install",
                     "SubjectName") == "CN=me"
    no_user = Registry(reg.path)
    with pytest.raises(LocalError, match="HKCU"):
        no_user.create_key(r"HKCU\x")
    no_user.close()


def test_delete_subtree_only(reg: Registry) -> None:
    reg.set_sz(r"HKLM\A\B\C", "v", "1")
    reg.set_sz(r"HKLM\A\B C", "v", "2")  # sibling whose name starts like B
    reg.set_sz(r"HKLM\A\B]", "v", "3")  # ']' sorts right after '\': must survive too
    assert reg.delete_key(r"hklm\a\b")
    assert not reg.key_exists(r"HKLM\A\B\C")
    assert reg.query(r"HKLM\A\B C", "v") == "2"
    assert reg.query(r"HKLM\A\B]", "v") == "3"
    assert not reg.delete_key(r"HKLM\A\B")
    with pytest.raises(LocalError):
        reg.delete_key("HKLM")


def test_walk_is_depth_first_sorted(reg: Registry) -> None:
    for k in (r"HKLM\R\b", r"HKLM\R\a\z", r"HKLM\R\a b", r"HKLM\R\a\y"):
        reg.create_key(k)
    assert [k for k, _ in reg.walk(r"HKLM\R")] == [
        r"HKLM\R", r"HKLM\R\a", r"HKLM\R\a\y", r"HKLM\R\a\z", r"HKLM\R\a b", r"HKLM\R\b"]


def test_missing_key_and_value_errors(reg: Registry) -> None:
    with pytest.raises(NotFoundError, match="key not found"):
        reg.values(r"HKLM\nope")
    reg.create_key(r"HKLM\yes")
    with pytest.raises(NotFoundError, match="value not found"):
        reg.get_value(r"HKLM\yes", "v")
    assert reg.query(r"HKLM\nope", "v") is None
    assert not reg.delete_value(r"HKLM\nope", "v")


def test_transaction_rollback_and_savepoints(reg: Registry) -> None:
    reg.set_sz(r"HKLM\T", "keep", "1")
    with reg.transaction():
        reg.set_sz(r"HKLM\T", "outer", "1")
        with reg.transaction():
            reg.set_sz(r"HKLM\T\inner", "v", "1")
            raise Rollback
    assert reg.query(r"HKLM\T", "outer") == "1"
    assert not reg.key_exists(r"HKLM\T\inner")

    with pytest.raises(RuntimeError), reg.transaction():
        reg.set_sz(r"HKLM\T", "gone", "1")
        reg.delete_key(r"HKLM\T")
        raise RuntimeError("boom")
    assert reg.query(r"HKLM\T", "keep") == "1"
    assert reg.query(r"HKLM\T", "gone") is None


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Read-modify-write increments from several connections: BEGIN IMMEDIATE serialises them."""
    path = tmp_path / "shared.db"
    Registry(path).close()

    def worker() -> None:
        r = Registry(path)
        for _ in range(50):
            with r.transaction():
                n = r.query(r"HKLM\C", "n") or 0
                assert isinstance(n, int)
                r.set_dword(r"HKLM\C", "n", n + 1)
        r.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = Registry(path)
    assert r.query(r"HKLM\C", "n") == 200
    r.close()


def test_fold_keeps_length() -> None:
    assert fold("straße") == "STRAßE"
    assert fold("ǆ") in ("Ǆ", "ǅ", "ǆ")
    assert len(fold("ﬃ")) == 1


# --- model-based check against a dict -------------------------------------------------------

NAMES = st.sampled_from(["a", "A", "b", "Key", "kEY", "ß", "x y"])
KEYS = st.lists(NAMES, min_size=1, max_size=3).map(lambda p: "HKLM\\" + "\\".join(p))
VALUE_NAMES = st.sampled_from(["", "v", "V", "w"])
DATA = st.one_of(
    st.tuples(st.just(RegType.REG_SZ), st.text(max_size=5)),
    st.tuples(st.just(RegType.REG_DWORD), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(RegType.REG_BINARY), st.binary(max_size=5)),
)


class RegistryModel(RuleBasedStateMachine):
    """Keys and values mirrored in a dict keyed by folded paths/names."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        self.reg = Registry(Path(self._dir.name) / "m.db")
        self.keys: set[str] = {"HKLM", "HKU"}
        self.values: dict[tuple[str, str], tuple[RegType, object]] = {}

    def _ensure(self, key: str) -> None:
        parts = fold(key).split("\\")
        for i in range(1, len(parts) + 1):
            self.keys.add("\\".join(parts[:i]))

    @rule(key=KEYS)
    def create(self, key: str) -> None:
        self.reg.create_key(key)
        self._ensure(key)

    @rule(key=KEYS, name=VALUE_NAMES, data=DATA)
    def set_value(self, key: str, name: str, data: tuple[RegType, object]) -> None:
        self.reg.set_value(key, name, data[0], data[1])  # type: ignore[arg-type]
        self._ensure(key)
        self.values[(fold(key), fold(name))] = data

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        existed = self.reg.delete_key(key)
        k = fold(key)
        assert existed == (k in self.keys)
        self.keys = {x for x in self.keys if x != k and not x.startswith(k + "\\")}
        self.values = {kv: d for kv, d in self.values.items()
                       if kv[0] != k and not kv[0].startswith(k + "\\")}

    @rule(key=KEYS, name=VALUE_NAMES)
    def delete_value(self, key: str, name: str) -> None:
        existed = self.reg.delete_value(key, name)
        assert existed == ((fold(key), fold(name)) in self.values)
        self.values.pop((fold(key), fold(name)), None)

    @rule(key=KEYS, name=VALUE_NAMES, data=DATA)
    def rolled_back_write(self, key: str, name: str, data: tuple[RegType, object]) -> None:
        with self.reg.transaction():
            self.reg.set_value(key, name, data[0], data[1])  # type: ignore[arg-type]
            self.reg.delete_key(r"HKLM\a")
            raise Rollback

    @invariant()
    def matches_model(self) -> None:
        stored_keys = {fold(k) for k, _ in self.reg.walk("HKLM")} | {
            fold(k) for k, _ in self.reg.walk("HKU")}
        assert stored_keys == self.keys
        for (k, n), (t, d) in self.values.items():
            v = self.reg.get_value(k, n)
            assert (v.type, v.data) == (t, d)
        count = sum(len(vals) for _, vals in self.reg.walk("HKLM"))
        assert count == len(self.values)

    def teardown(self) -> None:
        self.reg.close()
        self._dir.cleanup()


RegistryModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestRegistryModel = RegistryModel.TestCase
