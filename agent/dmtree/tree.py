"""The DM tree: CSPs mounted by scope and URI prefix, and the one place that wires them up.

`./Device/Vendor/MSFT/<CSP>` (also `./Vendor/MSFT/<CSP>`) and `./User/Vendor/MSFT/<CSP>` are
dispatched to per-scope CSP instances; `./DevInfo` and `./DevDetail` sit at the root. The
levels above the mount points (`.`, `./Device`, `./Vendor/MSFT`, ...) are interior nodes the
tree answers itself: Get lists their children, anything else is 405. Matching of the fixed
names is case-insensitive, like the Windows client; dynamic node names keep their case.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.dmtree.csp import CSP, Deferred, ItemValue, NodeValue
from agent.dmtree.errors import DMStatusError, not_allowed, not_found
from agent.dmtree.uri import NodeUri, Scope, encode_segment, parse_uri
from agent.syncml.messages import Format

if TYPE_CHECKING:
    from agent.csp.clientcertificateinstall import CertRemovalHook
    from agent.device import DeviceContext
    from agent.enrollment import Enrollment

VENDOR_MSFT = ("Vendor", "MSFT")
_LOCATE_CACHE_LIMIT = 1024
_Found = tuple[CSP, tuple[str, ...]]


@dataclass(frozen=True)
class Mount:
    scope: Scope
    prefix: tuple[str, ...]  # e.g. ("Vendor", "MSFT", "NodeCache") or ("DevInfo",)
    csp: CSP


class DMTree:
    """Dispatches node operations to the mounted CSPs."""

    def __init__(self, mounts: Iterable[Mount] = (), deferred: Deferred | None = None) -> None:
        self.mounts: list[Mount] = list(mounts)
        self.deferred = deferred or Deferred()
        # LocURI text -> (parsed URI, owning CSP and path below its mount | None above the
        # mounts | a 404 error): a session names the same nodes over and over (NodeCache
        # evaluates every cached NodeURI on each ChangedNodes Get). Bounded; reset by mount().
        self._located: dict[str, tuple[NodeUri, _Found | DMStatusError | None]] = {}

    def mount(self, scope: Scope, prefix: Sequence[str], csp: CSP) -> None:
        self.mounts.append(Mount(scope, tuple(prefix), csp))
        self._located.clear()

    # --- operations --------------------------------------------------------------------------

    def get(self, uri: NodeUri | str) -> NodeValue:
        if type(uri) is str:  # _locate's memo hit for a node some CSP owns, inline
            hit = self._located.get(uri)
            if hit is not None and type(hit[1]) is tuple:
                csp, rel = hit[1]
                return csp.get(rel)
        uri, found = self._locate(uri)
        if found is None:
            return NodeValue(Format.NODE, "/".join(encode_segment(c)
                                                   for c in self._synthetic_children(uri)))
        csp, rel = found
        return csp.get(rel)

    def value_or_none(self, uri: NodeUri | str) -> NodeValue | None:
        """Get, with a missing (or unreadable) node as None: what NodeCache compares."""
        try:
            return self.get(uri)
        except DMStatusError:
            return None

    def add(self, uri: NodeUri | str, item: ItemValue) -> None:
        csp, rel = self._require_csp(uri, "Add")
        csp.add(rel, item)

    def replace(self, uri: NodeUri | str, item: ItemValue) -> None:
        if type(uri) is str:  # as in get()
            hit = self._located.get(uri)
            if hit is not None and type(hit[1]) is tuple:
                csp, rel = hit[1]
                csp.replace(rel, item)
                return
        csp, rel = self._require_csp(uri, "Replace")
        csp.replace(rel, item)

    def delete(self, uri: NodeUri | str) -> None:
        csp, rel = self._require_csp(uri, "Delete")
        csp.delete(rel)

    def exec(self, uri: NodeUri | str, item: ItemValue) -> None:
        csp, rel = self._require_csp(uri, "Exec")
        csp.exec(rel, item)

    def children(self, uri: NodeUri | str) -> list[str] | None:
        """Child names of an interior node, None for a leaf (raises for a missing node)."""
        value = self.get(uri)
        if value.format != Format.NODE:
            return None
        return [_unescape(c) for c in value.data.split("/")] if value.data else []

    # --- dispatch ----------------------------------------------------------------------------

    def _locate(self, uri: NodeUri | str) -> tuple[NodeUri, _Found | None]:
        """The parsed URI and `_find`'s answer, memoized by LocURI text (parse errors are
        not memoized: they are raised again each time)."""
        if not isinstance(uri, str):
            return uri, self._find(uri)
        hit = self._located.get(uri)
        if hit is None:
            parsed = parse_uri(uri)
            found: _Found | DMStatusError | None
            try:
                found = self._find(parsed)
            except DMStatusError as exc:
                found = exc
            if len(self._located) >= _LOCATE_CACHE_LIMIT:
                self._located.clear()
            hit = self._located[uri] = (parsed, found)
        parsed, result = hit
        if isinstance(result, DMStatusError):
            raise DMStatusError(result.code, result.message)  # a fresh one: tracebacks differ
        return parsed, result

    def _find(self, uri: NodeUri) -> tuple[CSP, tuple[str, ...]] | None:
        """The CSP owning the node and the path below its mount; None for a level above the
        mount points; DMStatusError 404 when nothing is there."""
        folded = tuple(s.casefold() for s in uri.segments)
        for m in self.mounts:
            if m.scope is not uri.scope:
                continue
            pre = tuple(p.casefold() for p in m.prefix)
            if folded[: len(pre)] == pre:
                return m.csp, uri.segments[len(pre):]
        if self._is_above_mounts(uri):
            return None
        raise not_found(uri.raw)

    def _require_csp(self, uri: NodeUri | str, verb: str) -> tuple[CSP, tuple[str, ...]]:
        uri, found = self._locate(uri)
        if found is None:
            raise not_allowed(verb, f"{uri.raw} (a permanent interior node)")
        return found

    def _prefixes(self, scope: Scope) -> list[tuple[str, ...]]:
        return [m.prefix for m in self.mounts if m.scope is scope]

    def _is_above_mounts(self, uri: NodeUri) -> bool:
        if not uri.segments:
            return uri.scope is Scope.GLOBAL or bool(self._prefixes(uri.scope))
        folded = tuple(s.casefold() for s in uri.segments)
        return any(len(p) > len(folded) and tuple(x.casefold() for x in p[: len(folded)]) ==
                   folded for p in self._prefixes(uri.scope))

    def _synthetic_children(self, uri: NodeUri) -> list[str]:
        names: list[str] = []
        if uri.scope is Scope.GLOBAL and not uri.segments:
            # The root: the standard objects, the scopes, and ./Vendor (device-targeted).
            names = [p[0] for p in self._prefixes(Scope.GLOBAL)]
            names += [s.value for s in (Scope.DEVICE, Scope.USER) if self._prefixes(s)]
            if self._prefixes(Scope.DEVICE):
                names.append(VENDOR_MSFT[0])
            return names
        depth = len(uri.segments)
        folded = tuple(s.casefold() for s in uri.segments)
        for p in self._prefixes(uri.scope):
            if len(p) > depth and tuple(x.casefold() for x in p[:depth]) == folded and \
                    p[depth] not in names:
                names.append(p[depth])
        return names


def _unescape(segment: str) -> str:
    from urllib.parse import unquote

    return unquote(segment)


def build_tree(ctx: DeviceContext, enrollment: Enrollment | None, *,
               clock: Callable[[], float] = time.time,
               cert_removal_hooks: Sequence[CertRemovalHook] | None = None) -> DMTree:
    """The device's DM tree: every CSP the agent implements, for the device and its user.

    `enrollment` supplies the ProviderID and EnrollmentId (SCEP registry key, task folder,
    DMClient); without one the tree still answers Gets (e.g. `dmagent tree get`) but refuses
    what needs an enrollment (Exec Enroll, DMClient)."""
    from agent.csp.clientcertificateinstall import ClientCertificateInstallCSP, remove_from_my
    from agent.csp.devdetail import devdetail_csp
    from agent.csp.devinfo import devinfo_csp
    from agent.csp.dmclient import DMClientCSP
    from agent.csp.nodecache import NodeCacheCSP
    from agent.csp.rootcatrusted import RootCATrustedCertificatesCSP

    tree = DMTree()
    registry = ctx.registry
    hooks = list(cert_removal_hooks) if cert_removal_hooks is not None else [remove_from_my]
    tree.mount(Scope.GLOBAL, ("DevInfo",), devinfo_csp(ctx.device))
    tree.mount(Scope.GLOBAL, ("DevDetail",), devdetail_csp(ctx.device))
    tasks = ctx.config.tasks
    scopes = [Scope.DEVICE] + ([Scope.USER] if registry.current_user_sid else [])
    for scope in scopes:
        cci = ClientCertificateInstallCSP(
            registry, ctx.sealer, scope, enrollment, deferred=tree.deferred, events=ctx.events,
            clock=clock, removal_hooks=hooks, task_attempts=tasks.attempts,
            # the task record keeps whole seconds; shortened test intervals round down to 0
            task_interval_seconds=int(tasks.interval_seconds))
        tree.mount(scope, (*VENDOR_MSFT, "ClientCertificateInstall"), cci)
        tree.mount(scope, (*VENDOR_MSFT, "NodeCache"), NodeCacheCSP(registry, scope, tree))
        tree.mount(scope, (*VENDOR_MSFT, "RootCATrustedCertificates"),
                   RootCATrustedCertificatesCSP(registry, scope))
    tree.mount(Scope.DEVICE, (*VENDOR_MSFT, "DMClient"), DMClientCSP(registry, enrollment,
                                                                   clock=clock))
    return tree
