"""agent.dataclass_cache: dataclass methods compiled once, kept beside the .pyc, identical.

Each scenario runs in a fresh interpreter (the cache patches the `dataclasses` module of the
process it is enabled in) on a throwaway package, and compares what the classes do with the
cache cold, warm, and not enabled at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import MAGIC_NUMBER
from pathlib import Path
from typing import Any

import pytest

from agent import dataclass_cache

REPO = Path(__file__).resolve().parents[2]

MODULE = '''
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """A frozen message, as the agent's are."""

    name: str
    size: int = 0
    parts: tuple[str, ...] = field(default_factory=tuple)


@dataclass(order=True)
class Counter:
    value: int = 0
'''

# Everything a caller can observe of the classes, as JSON.
PROBE = '''
import json, sys
from agent import dataclass_cache
if sys.argv[1] == "on":
    assert "dataclasses" not in sys.modules
    dataclass_cache.enable(("dcpkg",))
    assert "dataclasses" not in sys.modules  # enable() must not import it
import dataclasses, inspect
import dcpkg.m as m
r = m.Record("a", 2, ("x",))
try:
    r.size = 3
    frozen = "assigned"
except dataclasses.FrozenInstanceError as exc:
    frozen = type(exc).__name__
try:
    del r.name
    deleted = "deleted"
except dataclasses.FrozenInstanceError as exc:
    deleted = type(exc).__name__
codes = {f"{cls.__name__}.{meth}": getattr(cls, meth).__code__.co_code.hex()
         for cls in (m.Record, m.Counter)
         for meth in ("__init__", "__repr__", "__eq__")}
print(json.dumps({
    "repr": repr(r), "eq": r == m.Record("a", 2, ("x",)), "ne": r == m.Record("b"),
    "hash": hash(r) == hash(m.Record("a", 2, ("x",))), "frozen": frozen, "deleted": deleted,
    "default": repr(m.Record("z")), "replace": repr(dataclasses.replace(r, size=9)),
    "signature": str(inspect.signature(m.Record)),
    "init_annotations": {k: str(v) for k, v in m.Record.__init__.__annotations__.items()},
    "order": m.Counter(1) < m.Counter(2), "counter_hash": m.Counter.__hash__ is None,
    "codes": codes, "filename": m.Record.__init__.__code__.co_filename,
    "stats": dataclass_cache.stats(),
}))
'''


@pytest.fixture
def package(tmp_path: Path) -> Path:
    pkg = tmp_path / "dcpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "m.py").write_text(MODULE)
    return pkg


def _probe(pkg: Path, mode: str, *, env: dict[str, str] | None = None) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    base["PYTHONPATH"] = os.pathsep.join([str(pkg.parent), str(REPO)])
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env={**base, **(env or {})},
                          capture_output=True, text=True, check=False, cwd=pkg.parent)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _rewrite(pkg: Path, text: str) -> None:
    """New source for dcpkg.m, with a later mtime: the same size within the same second
    would let Python reuse the old .pyc."""
    source = pkg / "m.py"
    before = source.stat().st_mtime
    source.write_text(text)
    os.utime(source, (before + 10, before + 10))


def _cache_file(pkg: Path) -> Path:
    path = dataclass_cache.cache_path(str(pkg / "m.py"))
    assert path is not None
    return Path(path)


def _observed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "stats"}


def test_cold_then_warm_cache_behaves_as_plain_dataclasses(package: Path) -> None:
    plain = _probe(package, "off")
    assert plain["stats"] == {}
    cold = _probe(package, "on")
    used, compiled = cold["stats"]["dcpkg.m"]
    assert used == compiled > 0  # every method compiled: nothing was cached yet
    assert _cache_file(package).is_file()
    warm = _probe(package, "on")
    assert warm["stats"]["dcpkg.m"] == [used, 0]  # every method from the file
    assert _observed(cold) == _observed(plain) == _observed(warm)
    assert plain["frozen"] == plain["deleted"] == "FrozenInstanceError"
    assert plain["filename"] == "<string>"


def test_a_changed_class_is_compiled_again_not_served_stale(package: Path) -> None:
    _probe(package, "on")
    # A new default changes no source (defaults reach the methods as arguments): still cached,
    # and right.
    _rewrite(package, MODULE.replace("size: int = 0", "size: int = 7"))
    new_default = _probe(package, "on")
    assert new_default["stats"]["dcpkg.m"][1] == 0
    assert "size=7" in new_default["default"]
    assert _observed(new_default) == _observed(_probe(package, "off"))
    # A new field changes the source of every method: compiled, and cached from then on.
    _rewrite(package, MODULE.replace("size: int = 0", "size: int = 7\n    note: str = 'n'"))
    new_field = _probe(package, "on")
    assert new_field["stats"]["dcpkg.m"][1] > 0
    assert "note='n'" in new_field["default"]
    assert _observed(new_field) == _observed(_probe(package, "off"))
    assert _probe(package, "on")["stats"]["dcpkg.m"][1] == 0


@pytest.mark.parametrize("content", [
    b"", b"garbage", MAGIC_NUMBER + b"\x00\x01 not marshal",
    b"\x00\x00\r\n" + b"x" * 40,  # another Python's magic number
    MAGIC_NUMBER + __import__("marshal").dumps({"src": "not code"}),
    MAGIC_NUMBER + __import__("marshal").dumps([1, 2]),
])
def test_a_damaged_cache_file_is_ignored_and_replaced(package: Path, content: bytes) -> None:
    reference = _observed(_probe(package, "off"))
    cache = _cache_file(package)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(content)
    result = _probe(package, "on")
    assert result["stats"]["dcpkg.m"][1] > 0
    assert _observed(result) == reference
    assert cache.read_bytes().startswith(MAGIC_NUMBER)
    assert _probe(package, "on")["stats"]["dcpkg.m"][1] == 0


def test_nothing_is_written_when_python_writes_no_bytecode(package: Path) -> None:
    result = _probe(package, "on", env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert result["stats"]["dcpkg.m"][1] > 0
    assert not _cache_file(package).exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_an_unwritable_directory_is_no_error(package: Path) -> None:
    cache_dir = _cache_file(package).parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.chmod(0o555)
    try:
        result = _probe(package, "on")
    finally:
        cache_dir.chmod(0o755)
    assert result["stats"]["dcpkg.m"][1] > 0
    assert not _cache_file(package).exists()


def test_an_unwritable_cache_file_is_no_error(package: Path) -> None:
    cache = _cache_file(package)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.mkdir()  # a directory where the file should go: the rename fails
    result = _probe(package, "on")
    assert result["stats"]["dcpkg.m"][1] > 0
    assert cache.is_dir() and not list(cache.parent.glob("*.tmp"))


def test_modules_outside_the_packages_are_untouched(package: Path) -> None:
    script = textwrap.dedent('''
        import json, sys
        from agent import dataclass_cache
        dataclass_cache.enable(("otherpkg",))
        import dcpkg.m
        print(json.dumps(dataclass_cache.stats()))
    ''')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join([str(package.parent), str(REPO)])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, check=True)
    assert json.loads(proc.stdout) == {}
    assert not _cache_file(package).exists()


def test_enable_in_a_process_that_loaded_dataclasses_and_disable() -> None:
    import dataclasses

    dataclass_cache.enable(("tests",))
    try:
        assert getattr(dataclasses, "exec", None) is dataclass_cache._exec

        @dataclasses.dataclass(frozen=True)
        class Local:  # defined in this test module: in the "tests" package
            value: int = 1

        assert Local() == Local(1) and repr(Local(2)) == "test_enable_in_a_process_that_" \
            "loaded_dataclasses_and_disable.<locals>.Local(value=2)"
        assert dataclass_cache.stats()[__name__][0] > 0
    finally:
        dataclass_cache.disable()
    assert not hasattr(dataclasses, "exec")
    assert dataclass_cache.stats() == {}


def test_cache_path_is_beside_the_pyc(tmp_path: Path) -> None:
    from importlib.util import cache_from_source

    source = str(tmp_path / "mod.py")
    path = dataclass_cache.cache_path(source)
    assert path == cache_from_source(source)[:-len(".pyc")] + ".dataclasses"
