"""NodeCache CSP: `./{Device|User}/Vendor/MSFT/NodeCache/<ProviderID>` (also `./Vendor/MSFT/...`).

The server keeps a cache of device values and asks the device which ones changed instead of
reading them all (NodeCache CSP reference, "A typical DM session with the NodeCache CSP"):
- `Nodes/<NodeID>/NodeURI` names a node of the tree, `ExpectedValue` is what the server last
  saw there; `x-nodemon-nonexistent` (Data, or Meta Type `application/x-nodemon-nonexistent`)
  means "expected not to exist", Meta Type `application/x-nodemon-sha256` means ExpectedValue
  is the SHA-256 of the value (hex or base64);
- Replace/Add of `AutoSetExpectedValue` snapshots the node's current value into ExpectedValue
  (read through the tree, inside the same transaction);
- `ChangedNodes` lists, comma-separated (a NodeID may not contain a comma), the nodes whose
  current value differs from ExpectedValue; a node without NodeURI always counts as changed;
- `ChangedNodesData` is `<Nodes><Node Id=".." Uri="..">base64(current value)</Node></Nodes>`.

Persisted under `HKLM\\SOFTWARE\\Microsoft\\Provisioning\\NodeCache\\CSP\\Device\\<ProviderID>`
(`CacheVersion`; `Nodes\\<NodeID>` with `NodeURI`, `ExpectedValue`), user scope under the user's
hive (`HKU\\<SID>\\SOFTWARE\\...\\NodeCache\\CSP\\User\\<ProviderID>`).
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING, Final
from xml.sax.saxutils import escape, quoteattr

from agent.dmtree.csp import (
    ADG,
    AGR,
    CSP,
    ItemValue,
    NodeSpec,
    NodeValue,
    Op,
    Resolved,
    Value,
    interior,
    leaf,
)
from agent.dmtree.errors import DMStatusError, bad_value
from agent.dmtree.uri import Scope
from agent.registry import Registry, fold
from agent.syncml.messages import Format, StatusCode

if TYPE_CHECKING:
    from agent.dmtree.tree import DMTree

NONEXISTENT: Final = "x-nodemon-nonexistent"
TYPE_NONEXISTENT: Final = "application/x-nodemon-nonexistent"
TYPE_SHA256: Final = "application/x-nodemon-sha256"
# Value names as `Registry.subkey_values` keys them (folded).
_NODE_URI: Final = fold("NodeURI")
_EXPECTED: Final = fold("ExpectedValue")
_EXPECTED_TYPE: Final = fold("ExpectedValueType")
_UNREAD: Final = "\x00unread"  # not a value: NUL cannot be stored or sent in XML
_VALUE_FORMATS: Final = (Format.CHR, Format.INT, Format.BOOL, Format.B64, Format.XML,
                         Format.FLOAT, Format.DATE, Format.TIME, Format.BIN)

SCHEMA: Final = interior(
    "NodeCache", Op.GET,
    interior("{ProviderID}", ADG,
             leaf("CacheVersion", Format.CHR, AGR | Op.DELETE),
             leaf("ChangedNodes", Format.CHR, Op.GET),
             leaf("ChangedNodesData", Format.CHR, Op.GET),
             interior("Nodes", Op.GET,
                      interior("{NodeID}", ADG,
                               leaf("NodeURI", Format.CHR, ADG | Op.REPLACE),
                               leaf("ExpectedValue", Format.CHR, ADG | Op.REPLACE,
                                    accepts=_VALUE_FORMATS),
                               leaf("AutoSetExpectedValue", Format.CHR,
                                    ADG | Op.REPLACE, accepts=_VALUE_FORMATS)))))


class NodeCacheCSP(CSP):
    schema: NodeSpec = SCHEMA

    def __init__(self, registry: Registry, scope: Scope, tree: DMTree) -> None:
        self.registry = registry
        self.scope = scope
        self.tree = tree
        if scope is Scope.USER:
            self.root = (f"{registry.hkcu()}\\SOFTWARE\\Microsoft\\Provisioning\\NodeCache"
                         r"\CSP\User")
        else:
            self.root = r"HKLM\SOFTWARE\Microsoft\Provisioning\NodeCache\CSP\Device"
        self._evaluating = False

    def provider_key(self, provider: str) -> str:
        return f"{self.root}\\{provider}"

    def node_key(self, provider: str, node_id: str) -> str:
        return f"{self.provider_key(provider)}\\Nodes\\{node_id}"

    # --- schema hooks ------------------------------------------------------------------------

    def exists(self, r: Resolved) -> bool:
        pattern = r.pattern()
        if len(pattern) == 4:  # Nodes/<NodeID>/<leaf>: what every ExpectedValue Replace asks
            names = r.vars
            return self.registry.query(
                f"{self.root}\\{names['ProviderID']}\\Nodes\\{names['NodeID']}",
                r.spec.name) is not None
        if not pattern:
            return True
        provider = self.provider_key(r.var("ProviderID"))
        if len(pattern) == 2 and pattern[1] == "CacheVersion":
            return self.registry.query(provider, "CacheVersion") is not None
        if len(pattern) <= 2:  # the provider, ChangedNodes, ChangedNodesData, Nodes
            return self.registry.key_exists(provider)
        node = self.node_key(r.var("ProviderID"), r.var("NodeID"))
        if len(pattern) == 3:
            return self.registry.key_exists(node)
        return self.registry.query(node, r.spec.name) is not None

    def children(self, r: Resolved) -> list[str]:
        pattern = r.pattern()
        if not pattern:
            return self.registry.subkeys(self.root) if self.registry.key_exists(self.root) \
                else []
        if pattern[-1] == "Nodes":
            nodes = f"{self.provider_key(r.var('ProviderID'))}\\Nodes"
            return self.registry.subkeys(nodes) if self.registry.key_exists(nodes) else []
        return super().children(r)

    def read(self, r: Resolved) -> NodeValue:
        provider = r.var("ProviderID")
        name = r.spec.name
        if name == "CacheVersion":
            return NodeValue(Format.CHR, self._sz(self.provider_key(provider), name))
        if name in ("ChangedNodes", "ChangedNodesData"):
            changed = self._changed(provider)
            if name == "ChangedNodes":
                return NodeValue(Format.CHR, ",".join([c[0] for c in changed]))
            return NodeValue(Format.CHR, _changed_xml(changed))
        return NodeValue(Format.CHR, self._sz(self.node_key(provider, r.var("NodeID")), name))

    def write(self, r: Resolved, value: Value, item: ItemValue) -> None:
        names = r.vars
        provider = names["ProviderID"]
        name = r.spec.name
        if name == "CacheVersion":
            self.registry.set_sz(self.provider_key(provider), name, str(value))
            return
        node_id = names["NodeID"]
        self._check_node_id(node_id)
        key = f"{self.root}\\{provider}\\Nodes\\{node_id}"  # node_key(), inline
        if name == "NodeURI":
            self.registry.set_sz(key, name, str(value).strip())
        elif name == "ExpectedValue":
            kind = item.type
            kind = kind.strip().lower() if kind else ""
            expected = NONEXISTENT if kind == TYPE_NONEXISTENT else str(value)
            self.registry.set_sz(key, name, expected)
            if kind == TYPE_SHA256:
                self.registry.set_sz(key, "ExpectedValueType", "sha256")
            else:
                self.registry.delete_value(key, "ExpectedValueType")
        else:  # AutoSetExpectedValue: snapshot the current value of NodeURI
            uri = self._sz(key, "NodeURI")
            if not uri:
                raise bad_value(self.describe(r), "NodeURI is not set")
            current = self.tree.value_or_none(uri)
            self.registry.set_sz(key, "ExpectedValue",
                                 NONEXISTENT if current is None else current.data or "")
            self.registry.delete_value(key, "ExpectedValueType")
            self.registry.set_sz(key, name, "")

    def create(self, r: Resolved) -> None:
        if len(r.path) == 1:
            self.registry.create_key(self.provider_key(r.var("ProviderID")))
        else:
            self._check_node_id(r.var("NodeID"))
            self.registry.create_key(self.node_key(r.var("ProviderID"), r.var("NodeID")))

    def remove(self, r: Resolved) -> None:
        provider = r.var("ProviderID")
        pattern = r.pattern()
        if len(pattern) == 1:
            self.registry.delete_key(self.provider_key(provider))
        elif pattern[1] == "CacheVersion":
            self.registry.delete_value(self.provider_key(provider), "CacheVersion")
        elif len(pattern) == 3:
            self.registry.delete_key(self.node_key(provider, r.var("NodeID")))
        else:
            key = self.node_key(provider, r.var("NodeID"))
            self.registry.delete_value(key, r.spec.name)
            if r.spec.name == "ExpectedValue":
                self.registry.delete_value(key, "ExpectedValueType")

    # --- change detection --------------------------------------------------------------------

    def changed_nodes(self, provider: str) -> list[str]:
        return [node_id for node_id, _, _ in self._changed(provider)]

    def _changed(self, provider: str) -> list[tuple[str, str, str | None]]:
        """(NodeID, NodeURI, current data or None) for every node that differs."""
        if self._evaluating:  # a NodeURI pointing back at ChangedNodes: refuse, don't loop
            raise DMStatusError(StatusCode.COMMAND_FAILED, "NodeCache refers to itself")
        nodes = f"{self.provider_key(provider)}\\Nodes"
        if not self.registry.key_exists(nodes):
            return []
        self._evaluating = True
        try:
            out: list[tuple[str, str, str | None]] = []
            # Every node's values in one read; nodes watching the same URI read it once (the
            # evaluation only reads, so a value cannot change in between).
            current_by_uri: dict[str, str | None] = {}
            current_of = current_by_uri.get
            append = out.append
            for node_id, values in self.registry.subkey_values(nodes).items():
                get = values.get
                uri = get(_NODE_URI)
                if not isinstance(uri, str) or not uri:
                    append((node_id, "", None))
                    continue
                data = current_of(uri, _UNREAD)
                if data is _UNREAD:
                    current = self.tree.value_or_none(uri)
                    data = current_by_uri[uri] = None if current is None else (current.data or "")
                expected = get(_EXPECTED)
                if not isinstance(expected, str):
                    same = False  # nothing expected yet: report it so the server fills it
                elif get(_EXPECTED_TYPE) == "sha256":
                    same = _matches(data, expected, True)
                else:  # _matches without a hash, inline: this runs for every cached node
                    same = data is None if expected == NONEXISTENT else data == expected
                if not same:
                    append((node_id, uri, data))
            return out
        finally:
            self._evaluating = False

    # --- internals ---------------------------------------------------------------------------

    def _sz(self, key: str, name: str) -> str:
        value = self.registry.query(key, name)
        return value if isinstance(value, str) else ""

    def _check_node_id(self, node_id: str) -> None:
        if "," in node_id:
            raise bad_value(f"NodeCache node {node_id!r}", "a NodeID may not contain a comma")


def _matches(current: str | None, expected: str | None, hashed: bool) -> bool:
    if expected is None:
        return False  # nothing expected yet: report it so the server fills its cache
    if expected == NONEXISTENT:
        return current is None
    if current is None:
        return False
    if hashed:
        digest = hashlib.sha256(current.encode()).digest()
        return expected.strip().lower() == digest.hex() or \
            expected.strip() == base64.b64encode(digest).decode()
    return current == expected


def _changed_xml(changed: list[tuple[str, str, str | None]]) -> str:
    parts = ["<Nodes>"]
    for node_id, uri, data in changed:
        text = base64.b64encode(data.encode()).decode() if data else ""
        parts.append(f"<Node Id={quoteattr(node_id)} Uri={quoteattr(uri)}>{escape(text)}</Node>")
    parts.append("</Nodes>")
    return "".join(parts)
