"""`dmagent reg query|export|add|delete`: the registry store, shown and edited like `reg.exe`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.commands.base import App, add_json_flag

# reg.exe switches, accepted in their /x form and translated to -x before parsing (a parser
# with "/" as an option prefix would take absolute file paths for options).
REG_SWITCHES = frozenset({"/s", "/v", "/ve", "/t", "/d", "/f", "/y"})


def translate_switches(argv: list[str]) -> list[str]:
    """`dmagent reg query KEY /s` → `... -s`; only after the `reg` subcommand."""
    if "reg" not in argv:
        return argv
    at = argv.index("reg")
    return argv[:at] + [("-" + a[1:].lower()) if a.lower() in REG_SWITCHES else a
                        for a in argv[at:]]


_TYPES = ("REG_SZ", "REG_EXPAND_SZ", "REG_DWORD", "REG_QWORD", "REG_BINARY", "REG_MULTI_SZ")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "reg", help="query, export and edit the agent's registry store (like reg.exe)",
        description="The registry store holds what Windows keeps in the registry: SCEP Install "
                    "nodes under HKLM\\Software\\Microsoft\\SCEP, their status, tasks, "
                    "enrollments. Options take reg.exe's /x form or -x.")
    rsub = p.add_subparsers(dest="reg_cmd", required=True, metavar="{query,export,add,delete}")

    q = rsub.add_parser("query", help="show a key, its values and subkeys")
    q.add_argument("key", help=r"e.g. 'HKLM\Software\Microsoft\SCEP'")
    q.add_argument("-s", dest="recurse", action="store_true", help="all subkeys")
    q.add_argument("-v", dest="value", help="only this value")
    q.add_argument("-ve", dest="default", action="store_true",
                   help="only the default value")
    add_json_flag(q)
    q.set_defaults(func=run_query)

    e = rsub.add_parser("export", help="write a key and subtree as .reg")
    e.add_argument("key")
    e.add_argument("file", nargs="?", default="-",
                   help="output .reg file (UTF-16, as reg.exe writes); '-' or none: stdout")
    e.add_argument("-y", dest="overwrite", action="store_true",
                   help="overwrite an existing file")
    e.set_defaults(func=run_export)

    a = rsub.add_parser("add", help="add a key or set a value")
    a.add_argument("key")
    a.add_argument("-v", dest="value", help="value name")
    a.add_argument("-ve", dest="default", action="store_true", help="the default value")
    a.add_argument("-t", dest="type", default="REG_SZ", choices=_TYPES)
    a.add_argument("-d", dest="data", default="",
                   help="data (REG_MULTI_SZ entries separated by \\0, binary as hex)")
    a.add_argument("-f", dest="force", action="store_true", help="(accepted for reg.exe "
                   "compatibility; never prompts)")
    a.set_defaults(func=run_add)

    d = rsub.add_parser("delete", help="delete a key (with subkeys) or value")
    d.add_argument("key")
    d.add_argument("-v", dest="value", help="delete only this value")
    d.add_argument("-ve", dest="default", action="store_true",
                   help="delete the default value")
    d.add_argument("-f", dest="force", action="store_true", help="(accepted; never prompts)")
    d.set_defaults(func=run_delete)


def run_query(args: argparse.Namespace, app: App) -> int:
    from agent.regformat import format_query, query_data_text

    reg = app.ctx.registry
    key = reg.key_path(args.key)
    only = "" if args.default else args.value
    if only is not None:
        blocks = [(key, [reg.get_value(key, only)])]
        subkeys: list[str] = []
    elif args.recurse:
        blocks = list(reg.walk(key))
        subkeys = []
    else:
        blocks = [(key, reg.values(key))]
        subkeys = [f"{key}\\{name}" for name in reg.subkeys(key)]
    if args.json:
        app.print_json([{"key": k, "values": [
            {"name": v.name, "type": v.type.name, "data": _json_data(v.data),
             "text": query_data_text(v)} for v in vals]} for k, vals in blocks]
            + [{"key": s, "values": None} for s in subkeys])
    else:
        app.stdout.write(format_query(blocks, subkeys))
    return 0


def _json_data(data: object) -> object:
    if isinstance(data, bytes):
        return data.hex()
    if isinstance(data, tuple):
        return list(data)
    return data


def run_export(args: argparse.Namespace, app: App) -> int:
    from agent.errors import LocalError
    from agent.regformat import format_reg_file

    reg = app.ctx.registry
    text = format_reg_file(reg.walk(reg.key_path(args.key)))
    if args.file == "-":
        app.stdout.write(text.replace("\r\n", "\n"))
        return 0
    out = Path(args.file)
    if out.exists() and not args.overwrite:
        raise LocalError(f"{out} exists", advice="add /y to overwrite it")
    out.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    print("The operation completed successfully.", file=sys.stderr)
    return 0


def run_add(args: argparse.Namespace, app: App) -> int:
    from agent.errors import LocalError
    from agent.registry import RegType

    reg = app.ctx.registry
    name = "" if args.default else args.value
    if name is None:
        reg.create_key(args.key)
        return 0
    rtype = RegType[args.type]
    data: Any
    try:
        if rtype in (RegType.REG_DWORD, RegType.REG_QWORD):
            data = int(args.data, 0)
        elif rtype is RegType.REG_BINARY:
            data = bytes.fromhex(args.data)
        elif rtype is RegType.REG_MULTI_SZ:
            data = tuple(s for s in args.data.split("\\0") if s)
        else:
            data = args.data
    except ValueError:
        raise LocalError(f"invalid data for {rtype.name}: {args.data!r}") from None
    reg.set_value(args.key, name, rtype, data)
    return 0


def run_delete(args: argparse.Namespace, app: App) -> int:
    from agent.errors import NotFoundError

    reg = app.ctx.registry
    name = "" if args.default else args.value
    found = reg.delete_key(args.key) if name is None else reg.delete_value(args.key, name)
    if not found:
        raise NotFoundError("The system was unable to find the specified registry key or value.")
    return 0
