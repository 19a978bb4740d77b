"""Compiled dataclass methods, kept next to the module's .pyc so a start skips recompiling them.

`@dataclass(frozen=True)` writes the source of each class's `__init__`, `__repr__`, `__eq__`,
`__hash__`, `__setattr__` and `__delattr__` and compiles it with `exec`, at every import: on
CPython 3.11 that is ~0.6-1 ms a class, and `dmagent scep enroll` defines 22 of them on its way
to the first request (~15 ms of its start, the largest single item left). Compiling is almost
all of it (a class made from already compiled code costs ~0.08 ms). A .pyc cannot hold these
functions, since they do not exist until the decorator runs; this module is their .pyc.

`enable()` gives the `dataclasses` module an `exec` of its own (a module global shadows the
builtin it calls; CPython 3.10-3.13 all run the generated source through that one name). For a
module of `packages`, the source is looked up in that module's cache file,
`__pycache__/<module>.<tag>.dataclasses` beside its .pyc (what `importlib.util.cache_from_source`
names, `.pyc` swapped); a miss is compiled as `exec` would (same file name, no inherited
`__future__` flags) and the file is rewritten at exit. Every other module, and every other use
of `exec`, gets the builtin unchanged.

Why it is safe:
- the key is the generated source itself, so a cached function is the one `exec` would have
  made from the same text; a changed class writes other text, misses, and is compiled afresh;
- a file is read only when it starts with this interpreter's bytecode magic number, and only a
  dict of str -> code object is accepted; anything else is ignored (and replaced at exit);
- the files live where the module's .pyc files do, so whoever can change them can change the
  .pyc files too (no new trust); nothing is written when Python writes no bytecode
  (`sys.dont_write_bytecode`, PYTHONDONTWRITEBYTECODE) or the directory is not writable.
"""

from __future__ import annotations

import builtins
import contextlib
import marshal
import os
import sys
import types
from importlib.util import MAGIC_NUMBER, cache_from_source
from typing import Any, Final

OUR_PACKAGES: Final = ("agent", "keystores", "service", "lab")
SUFFIX: Final = ".dataclasses"
_FILENAME: Final = "<string>"  # what exec(str) compiles under

_builtin_exec: Final = builtins.exec


class _ModuleCache:
    """One module's compiled methods: what its file held, and what this process used."""

    __slots__ = ("misses", "path", "stored", "used")

    def __init__(self, path: str) -> None:
        self.path = path
        self.stored = _read(path)
        self.used: dict[str, types.CodeType] = {}
        self.misses = 0

    def code_for(self, source: str) -> types.CodeType:
        code = self.stored.get(source)
        if code is None:
            # exec(str) compiles with the caller's __future__ flags; dataclasses has none
            code = compile(source, _FILENAME, "exec", dont_inherit=True)
            self.misses += 1
        self.used[source] = code
        return code

    def stale(self) -> bool:
        """Rewrite when something was compiled, or the file holds code no class asked for."""
        return self.misses > 0 or self.stored.keys() != self.used.keys()


class _State:
    def __init__(self, packages: tuple[str, ...]) -> None:
        self.packages = packages
        self.modules: dict[str, _ModuleCache | None] = {}


class _Switch:
    state: _State | None = None  # None: disabled


_switch: Final = _Switch()


def enable(packages: tuple[str, ...] = OUR_PACKAGES) -> None:
    """Serve the dataclass methods of `packages`' modules from their cache files (idempotent).

    Call it from the program's entry point, before the modules defining dataclasses are
    imported. It imports nothing: when `dataclasses` is not loaded yet, it is given its `exec`
    as its import finishes (`_PatchOnImport`), so a command can start its own work (a key
    generation) before paying for `dataclasses` and `inspect`.
    """
    if _switch.state is not None:
        _switch.state.packages = tuple(sorted({*_switch.state.packages, *packages}))
        return
    import atexit

    _switch.state = _State(tuple(packages))
    atexit.register(flush)
    loaded = sys.modules.get("dataclasses")
    if loaded is not None:
        _patch(loaded)
    else:
        sys.meta_path.insert(0, _PatchOnImport())


def _patch(dataclasses: types.ModuleType) -> None:
    dataclasses.exec = _exec  # type: ignore[attr-defined]


class _PatchOnImport:
    """A meta path finder (PEP 451) that finds nothing itself: it lets the other finders find
    `dataclasses` and has the module patched once it has run, then leaves `sys.meta_path`."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "dataclasses":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        run = getattr(loader, "exec_module", None)
        if run is None:
            return spec  # a loader of another kind: dataclasses runs uncached

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            if _switch.state is not None:
                _patch(module)

        loader.exec_module = exec_module
        return spec


def disable() -> None:
    """Give `dataclasses` the builtin `exec` back (the caches in memory are dropped unwritten)."""
    _switch.state = None
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
    dataclasses = sys.modules.get("dataclasses")
    if dataclasses is not None and getattr(dataclasses, "exec", None) is _exec:
        del dataclasses.exec


def flush() -> None:
    """Write the cache files of the modules whose classes compiled something new."""
    state = _switch.state
    if state is None or sys.dont_write_bytecode:
        return
    for cache in list(state.modules.values()):
        if cache is not None and cache.used and cache.stale():
            _write(cache.path, cache.used)
            cache.stored, cache.misses = dict(cache.used), 0


def stats() -> dict[str, tuple[int, int]]:
    """Per cached module: (methods used, of them compiled because the cache missed)."""
    state = _switch.state
    if state is None:
        return {}
    return {name: (len(c.used), c.misses) for name, c in state.modules.items() if c}


def cache_path(module_file: str) -> str | None:
    """The cache file of the module at `module_file` (None: it has no .pyc location)."""
    try:
        pyc = cache_from_source(module_file)
    except (NotImplementedError, ValueError):
        return None
    return pyc[:-len(".pyc")] + SUFFIX if pyc.endswith(".pyc") else None


def _exec(source: Any, globals: Any = None, locals: Any = None, /) -> None:
    """`exec` for the dataclasses module: cached code for our modules' generated methods."""
    state = _switch.state
    if state is not None and type(source) is str and type(globals) is dict:
        cache = _module_cache(state, globals)
        if cache is not None:
            source = cache.code_for(source)
    _builtin_exec(source, globals, locals)


def _module_cache(state: _State, globals: dict[str, Any]) -> _ModuleCache | None:
    name = globals.get("__name__")
    if not isinstance(name, str):
        return None
    try:
        return state.modules[name]
    except KeyError:
        pass
    cache = None
    file = globals.get("__file__")
    if name.partition(".")[0] in state.packages and isinstance(file, str) and \
            file.endswith(".py"):
        path = cache_path(file)
        cache = _ModuleCache(path) if path is not None else None
    state.modules[name] = cache
    return cache


def _read(path: str) -> dict[str, types.CodeType]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    if raw[:len(MAGIC_NUMBER)] != MAGIC_NUMBER:
        return {}  # another Python's bytecode (or not ours at all)
    try:
        # as trusted as the .pyc files beside it (see the module docstring)
        table = marshal.loads(raw[len(MAGIC_NUMBER):])  # noqa: S302
    except (EOFError, ValueError, TypeError):
        return {}
    if not isinstance(table, dict) or not all(
            type(k) is str and type(v) is types.CodeType for k, v in table.items()):
        return {}
    return table


def _write(path: str, table: dict[str, types.CodeType]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(MAGIC_NUMBER + marshal.dumps(table))
        os.replace(tmp, path)  # readers see the old file or the new one, never a half
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
