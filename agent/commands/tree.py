"""`dmagent tree get|list`: read the local DM tree the way the MDM server does (Get).

Nothing here writes: Get never changes the tree, so this is safe next to a running daemon.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from agent.commands.base import App, add_json_flag

if TYPE_CHECKING:
    from agent.dmtree.tree import DMTree
    from agent.dmtree.uri import NodeUri

MAX_LIST_DEPTH = 32


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tree", help="read the local DM tree",
        description="Read the device's DM tree as the MDM server sees it: Get of a leaf "
                    "answers its value and Meta Format, Get of an interior node its child "
                    "names. Scopes: ./Device/Vendor/MSFT/... (or ./Vendor/MSFT/...), "
                    "./User/Vendor/MSFT/..., ./DevInfo, ./DevDetail.")
    p.add_argument("--enrollment", metavar="ID",
                   help="the MDM enrollment whose ProviderID names the nodes (default: the "
                        "only or first one)")
    tsub = p.add_subparsers(dest="tree_cmd", required=True, metavar="{get,list}")

    g = tsub.add_parser("get", help="Get one node: a value with its format, or child names")
    g.add_argument("uri", help="e.g. ./Device/Vendor/MSFT/ClientCertificateInstall/SCEP")
    add_json_flag(g)
    g.set_defaults(func=run_get)

    ls = tsub.add_parser("list", help="list a subtree recursively (for debugging)")
    ls.add_argument("uri", nargs="?", default=".", help="where to start (default: the root)")
    add_json_flag(ls)
    ls.set_defaults(func=run_list)


def _tree(args: argparse.Namespace, app: App) -> DMTree:
    from agent.dmtree.tree import build_tree
    from agent.enrollment import EnrollmentStore

    store = EnrollmentStore(app.ctx.registry)
    enrollment = store.get(args.enrollment) if args.enrollment else store.default()
    return build_tree(app.ctx, enrollment)


def _error(uri: str, exc: Exception) -> Exception:
    from agent.dmtree.errors import DMStatusError
    from agent.errors import LocalError, NotFoundError

    assert isinstance(exc, DMStatusError)
    if exc.code == 404:
        return NotFoundError(f"{uri}: 404 {exc.message}",
                             advice="`dmagent tree list` shows what exists")
    return LocalError(f"{uri}: {exc.code} {exc.message}")


def run_get(args: argparse.Namespace, app: App) -> int:
    from agent.dmtree.errors import DMStatusError
    from agent.dmtree.uri import parse_uri
    from agent.syncml.messages import Format

    tree = _tree(args, app)
    try:
        uri = parse_uri(args.uri)
        value = tree.get(uri)
    except DMStatusError as exc:
        raise _error(args.uri, exc) from None
    children = _split(value.data) if value.format == Format.NODE else None
    if args.json:
        app.print_json({"uri": uri.raw, "format": value.format, "type": value.type,
                        "data": value.data, "children": children})
    elif children is not None:
        for name in children:
            app.print(name)
    else:
        app.print(f"[{value.format}] {value.data or ''}")
    return 0


def run_list(args: argparse.Namespace, app: App) -> int:
    from agent.dmtree.errors import DMStatusError
    from agent.dmtree.uri import parse_uri

    tree = _tree(args, app)
    try:
        start = parse_uri(args.uri)
        tree.get(start)
    except DMStatusError as exc:
        raise _error(args.uri, exc) from None
    rows: list[dict[str, Any]] = []
    _walk(tree, start, rows, set(), 0)
    if args.json:
        app.print_json(rows)
        return 0
    for row in rows:
        if row["format"] == "node":
            app.print(f"{row['uri']}/")
        elif row.get("error"):
            app.print(f"{row['uri']}  ({row['error']})")
        else:
            app.print(f"{row['uri']}  [{row['format']}] {row['data'] or ''}")
    return 0


def _walk(tree: DMTree, uri: NodeUri, rows: list[dict[str, Any]], seen: set[str],
          depth: int) -> None:
    from agent.dmtree.errors import DMStatusError
    from agent.dmtree.uri import encode_segment, parse_uri
    from agent.syncml.messages import Format

    if uri.canonical in seen:  # ./Vendor/MSFT is ./Device/Vendor/MSFT: list it once
        return
    seen.add(uri.canonical)
    try:
        value = tree.get(uri)
    except DMStatusError as exc:  # e.g. 405 for the write-only Challenge, Exec-only Enroll
        rows.append({"uri": uri.canonical, "format": None, "data": None,
                     "error": f"{exc.code} {exc.message}"})
        return
    rows.append({"uri": uri.canonical, "format": str(value.format), "data": value.data})
    if value.format == Format.NODE and depth < MAX_LIST_DEPTH:
        for name in _split(value.data):
            child = parse_uri(f"{uri.canonical}/{encode_segment(name)}")
            _walk(tree, child, rows, seen, depth + 1)


def _split(data: str | None) -> list[str]:
    from urllib.parse import unquote

    return [unquote(c) for c in data.split("/")] if data else []
