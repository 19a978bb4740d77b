"""The CSP plug-in interface: a node schema with access rules, and a base class enforcing them.

A configuration service provider owns the subtree under its mount point (e.g.
`./Device/Vendor/MSFT/NodeCache`). It declares that subtree as `NodeSpec`s — name, format and
the operations the DDF allows — and implements a few hooks (exists / read / write / remove /
execute). `CSP` does the checks every CSP shares, in the order the Windows client reports them:

1. unknown node → 404 (OMA-TS-DM_RepPro §10 "Not found");
2. operation not in the node's AccessType → 405 (e.g. Replace on a Get-only status node);
3. a Meta Format that does not match the node's format → 415 (OMA-TS-DM_TND §7: the format
   of the data must match the node's format);
4. Add on an existing node → 418; Get/Delete of a missing node → 404;
5. data that does not parse as the node's format (int, bool) → 400; CSP-specific checks
   (ranges, enumerations) also answer 400.

Paths are tuples of decoded node names relative to the mount point; `()` is the CSP root.
Hooks run inside the executor's store transaction, so registry writes roll back with an Atomic.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final

from agent.dmtree.errors import DMStatusError, bad_value, not_allowed, not_found
from agent.dmtree.uri import encode_segment
from agent.syncml.messages import Format, StatusCode

__all__ = ["CSP", "DMStatusError", "Deferred", "ItemValue", "NodeSpec", "NodeValue", "Op",
           "Resolved", "Value", "interior", "item_value", "leaf"]


class Op(enum.Flag):
    """DDF AccessType."""

    ADD = enum.auto()
    DELETE = enum.auto()
    GET = enum.auto()
    REPLACE = enum.auto()
    EXEC = enum.auto()


G: Final = Op.GET
ADGR: Final = Op.ADD | Op.DELETE | Op.GET | Op.REPLACE
ADG: Final = Op.ADD | Op.DELETE | Op.GET
AGR: Final = Op.ADD | Op.GET | Op.REPLACE


@dataclass(frozen=True)
class NodeValue:
    """What Get answers: the Results item's Meta Format (and Type) and its Data."""

    format: str
    data: str | None
    type: str | None = None


@dataclass(frozen=True)
class ItemValue:
    """What Add/Replace/Exec carry: the item's Data and the Meta that applies to it."""

    data: str | None = None
    format: str | None = None
    type: str | None = None


_new_object: Final = object.__new__


def item_value(data: str | None, format: str | None, type: str | None) -> ItemValue:
    """`ItemValue(data, format, type)` without the frozen dataclass `__init__` (which sets each
    field through `object.__setattr__`): the executor makes one per Add/Replace/Exec. Same
    object as the constructor's (tests/unit/test_dmtree_single.py); valid while ItemValue has
    exactly these three fields, which is checked below at import."""
    obj: ItemValue = _new_object(ItemValue)
    d = obj.__dict__
    d["data"] = data
    d["format"] = format
    d["type"] = type
    return obj


if tuple(ItemValue.__dataclass_fields__) != ("data", "format", "type"):  # pragma: no cover
    raise TypeError("item_value() no longer builds every ItemValue field")

Value = str | int | bool | None  # parsed data handed to `write`


@dataclass(frozen=True)
class NodeSpec:
    """One node of a CSP's DDF. A name in braces (`{UniqueID}`) matches any node name."""

    name: str
    format: str
    access: Op
    children: tuple[NodeSpec, ...] = ()
    accepts: frozenset[str] = frozenset()  # further Meta Formats accepted on write
    replace_creates: bool = True  # Replace on a missing leaf creates it (ClientCertificateInstall)

    # cached_property (computed once per spec, stored in the instance dict, which a frozen
    # dataclass still has): they are read on every command.
    @cached_property
    def dynamic(self) -> bool:
        return self.name.startswith("{")

    @cached_property
    def is_interior(self) -> bool:
        return self.format == Format.NODE

    def child(self, name: str) -> NodeSpec | None:
        folded = name.casefold()
        for spec in self.children:
            if not spec.dynamic and spec.name.casefold() == folded:
                return spec
        for spec in self.children:
            if spec.dynamic:
                return spec
        return None

    def accepted_formats(self) -> frozenset[str]:
        return self._accepted

    @cached_property
    def _accepted(self) -> frozenset[str]:
        return self.accepts | {self.format}


def interior(name: str, access: Op, *children: NodeSpec) -> NodeSpec:
    return NodeSpec(name, Format.NODE, access, tuple(children))


def leaf(name: str, fmt: str, access: Op, *, accepts: Iterable[str] = (),
         replace_creates: bool = True) -> NodeSpec:
    return NodeSpec(name, fmt, access, (), frozenset(accepts), replace_creates)


@dataclass(frozen=True)
class Resolved:
    """A path matched against the schema: the node's spec and the names of dynamic nodes."""

    path: tuple[str, ...]
    chain: tuple[NodeSpec, ...]  # the spec of each path element, root first (len = path + 1)
    vars: dict[str, str] = field(default_factory=dict)

    @cached_property
    def spec(self) -> NodeSpec:
        return self.chain[-1]

    @property
    def name(self) -> str:
        return self.path[-1] if self.path else ""

    def var(self, name: str) -> str:
        return self.vars[name]

    def pattern(self) -> tuple[str, ...]:
        """The path with dynamic names replaced by their placeholders, for dispatch tables."""
        return self._pattern

    @cached_property
    def _pattern(self) -> tuple[str, ...]:
        # Resolved objects are memoized per CSP (see CSP.resolve), so this is computed once.
        return tuple(s.name for s in self.chain[1:])


class Deferred:
    """Side effects that are not store writes (events, files), run only after the store
    transaction that caused them commits; an Atomic that rolls back discards them."""

    def __init__(self) -> None:
        # The actions not run yet. Read only (`len(pending)` is what mark() answers, without
        # a call: the executor takes one per command); change it through the methods.
        self.pending: list[Callable[[], None]] = []

    def defer(self, action: Callable[[], None]) -> None:
        self.pending.append(action)

    def mark(self) -> int:
        return len(self.pending)

    def discard(self, mark: int) -> None:
        del self.pending[mark:]

    def flush(self) -> None:
        actions, self.pending = self.pending, []
        for action in actions:
            action()

    def __len__(self) -> int:
        return len(self.pending)


_INT = re.compile(r"[+-]?[0-9]+")
INT_MIN: Final = -(2**31)
INT_MAX: Final = 2**32 - 1


def parse_value(spec: NodeSpec, item: ItemValue, where: str | Callable[[], str]) -> Value:
    """Check the Meta Format against the node and parse Data into the node's type.
    `where` names the node in error messages (a callable: only built when needed)."""
    fmt = item.format
    if fmt is not None and fmt not in spec._accepted:  # the common case: a valid format
        fmt = fmt.strip()
        if fmt and fmt.lower() not in spec._accepted:
            raise DMStatusError(StatusCode.UNSUPPORTED_MEDIA_TYPE,
                                f"{_where(where)} has format {spec.format}, not {fmt}")
    text = item.data
    kind = spec.format
    if kind == _CHR:
        return text if text is not None else ""
    if kind == Format.INT:
        if text is None or not _INT.fullmatch(text.strip()):
            raise bad_value(_where(where), f"{text!r} is not an integer")
        number = int(text.strip())
        if not INT_MIN <= number <= INT_MAX:
            raise bad_value(_where(where), f"{number} is out of the 32-bit range")
        return number
    if kind == Format.BOOL:
        word = (text or "").strip().lower()
        if word not in ("true", "false"):
            raise bad_value(_where(where), f"{text!r} is not true or false")
        return word == "true"
    if kind in (Format.NULL, Format.NODE):
        return None
    return text if text is not None else ""


_CHR: Final = str(Format.CHR)


def _where(where: str | Callable[[], str]) -> str:
    return where if isinstance(where, str) else where()


_RESOLVE_CACHE_LIMIT: Final = 1024


class CSP:
    """Base class of every CSP: schema resolution and the shared access rules.

    Subclasses set `schema` (the mount node, usually Get-only) and override the hooks they need.
    """

    schema: NodeSpec

    # --- the operations the tree calls -------------------------------------------------------

    def get(self, path: tuple[str, ...]) -> NodeValue:
        r = self.resolve(path)
        self._require(r, Op.GET, "Get")
        if not self.exists(r):
            raise not_found(self.describe(r))
        if r.spec.is_interior:
            return NodeValue(Format.NODE, "/".join(encode_segment(c) for c in self.children(r)))
        return self.read(r)

    def add(self, path: tuple[str, ...], item: ItemValue) -> None:
        r = self.resolve(path)
        self._require(r, Op.ADD, "Add")
        value = parse_value(r.spec, item, lambda: self.describe(r))
        if self.exists(r):
            raise DMStatusError(StatusCode.ALREADY_EXISTS, f"{self.describe(r)} already exists")
        if r.spec.is_interior:
            self.create(r)
        else:
            self.write(r, value, item)

    def replace(self, path: tuple[str, ...], item: ItemValue) -> None:
        r = self.resolve(path)
        self._require(r, Op.REPLACE, "Replace")
        value = parse_value(r.spec, item, lambda: self.describe(r))
        exists = self.exists(r)
        if not exists and not r.spec.replace_creates:
            raise not_found(self.describe(r))
        if r.spec.is_interior:
            if not exists:
                self.create(r)
            return
        self.write(r, value, item)

    def delete(self, path: tuple[str, ...]) -> None:
        r = self.resolve(path)
        self._require(r, Op.DELETE, "Delete")
        if not self.exists(r):
            raise not_found(self.describe(r))
        self.remove(r)

    def exec(self, path: tuple[str, ...], item: ItemValue) -> None:
        r = self.resolve(path)
        self._require(r, Op.EXEC, "Exec")
        self.execute(r, item)

    # --- schema ------------------------------------------------------------------------------

    def resolve(self, path: tuple[str, ...]) -> Resolved:
        """Match `path` against the schema (404 for a name the schema has no place for).

        Memoized per CSP instance: the schema does not change and a session asks for the same
        few paths over and over (a Resolved is immutable). Bounded, as the paths come from
        the server."""
        try:
            cache = self._resolved
        except AttributeError:
            cache = self._resolved = {}
        hit = cache.get(path)
        if hit is not None:
            return hit
        r = self._resolve(path)
        if len(cache) >= _RESOLVE_CACHE_LIMIT:
            cache.clear()
        cache[path] = r
        return r

    _resolved: dict[tuple[str, ...], Resolved]

    def _resolve(self, path: tuple[str, ...]) -> Resolved:
        spec = self.schema
        chain = [spec]
        dyn: dict[str, str] = {}
        for i, name in enumerate(path):
            child = spec.child(name)
            if child is None:
                raise not_found(self._join(path[: i + 1]))
            if child.dynamic:
                dyn[child.name.strip("{}")] = name
            chain.append(child)
            spec = child
        return Resolved(tuple(path), tuple(chain), dyn)

    def describe(self, r: Resolved) -> str:
        return self._join(r.path)

    def _join(self, path: tuple[str, ...]) -> str:
        return "/".join((self.schema.name, *path))

    def _require(self, r: Resolved, op: Op, verb: str) -> None:
        if not (r.spec.access._value_ & op._value_):  # Flag.__and__ is slow in a hot path
            if op is Op.EXEC:
                raise not_allowed("Exec", f"{self.describe(r)} (not executable)")
            raise not_allowed(verb, self.describe(r))

    # --- hooks -------------------------------------------------------------------------------

    def exists(self, r: Resolved) -> bool:
        """Whether the node exists. Default: static interior nodes always do."""
        return r.spec.is_interior and not any(s.dynamic for s in r.chain)

    def children(self, r: Resolved) -> list[str]:
        """Child names of an existing interior node. Default: the existing static children."""
        out = []
        for spec in r.spec.children:
            if spec.dynamic:
                continue
            sub = Resolved((*r.path, spec.name), (*r.chain, spec), r.vars)
            if self.exists(sub):
                out.append(spec.name)
        return out

    def read(self, r: Resolved) -> NodeValue:
        raise not_found(self.describe(r))

    def write(self, r: Resolved, value: Value, item: ItemValue) -> None:
        raise DMStatusError(StatusCode.COMMAND_FAILED, f"{self.describe(r)} cannot be written")

    def create(self, r: Resolved) -> None:
        raise DMStatusError(StatusCode.COMMAND_FAILED, f"{self.describe(r)} cannot be created")

    def remove(self, r: Resolved) -> None:
        raise DMStatusError(StatusCode.COMMAND_FAILED, f"{self.describe(r)} cannot be deleted")

    def execute(self, r: Resolved, item: ItemValue) -> None:
        raise DMStatusError(StatusCode.COMMAND_FAILED, f"{self.describe(r)} cannot be executed")


class ReadOnlyCSP(CSP):
    """A CSP of Get-only leaves computed from a table: `{("URI", "MaxDepth"): NodeValue}`."""

    def __init__(self, name: str, values: dict[tuple[str, ...], NodeValue]) -> None:
        self.values = {tuple(k): v for k, v in values.items()}
        self.schema = _schema_from_paths(name, self.values)
        # The table entries that are leaves of the schema (a path that is also the prefix of
        # another is an interior node there).
        self._leaves = {k: v for k, v in self.values.items()
                        if not any(len(o) > len(k) and o[:len(k)] == k for o in self.values)}

    def get(self, path: tuple[str, ...]) -> NodeValue:
        # A leaf named exactly as in the table is what the general path would answer too
        # (every node exists, every leaf is Get-only and reads its table entry): skip it.
        # Other spellings (names match case-insensitively) and interior nodes go through it.
        value = self._leaves.get(path)
        return value if value is not None else super().get(path)

    def exists(self, r: Resolved) -> bool:
        return True  # every node in the generated schema exists

    def read(self, r: Resolved) -> NodeValue:
        return self.values[r.pattern()]


def _schema_from_paths(name: str, values: dict[tuple[str, ...], NodeValue]) -> NodeSpec:
    def build(node_name: str, prefix: tuple[str, ...]) -> NodeSpec:
        names: list[str] = []
        for path in values:
            if len(path) > len(prefix) and path[: len(prefix)] == prefix and \
                    path[len(prefix)] not in names:
                names.append(path[len(prefix)])
        if not names:
            return leaf(node_name, values[prefix].format, G)
        return interior(node_name, G, *(build(n, (*prefix, n)) for n in names))

    return build(name, ())
