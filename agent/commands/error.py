"""`dmagent error CODE`: decode an HRESULT like `certutil -error`."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.base import App, add_json_flag


def register(sub: Any) -> None:
    p = sub.add_parser(
        "error", help="decode an HRESULT / Win32 error code (like certutil -error)",
        description="Decode an error code as Windows reports it: hex (0x80190194), signed "
                    "decimal as in the ErrorCode node (-2145844844), unsigned decimal, or a "
                    "bare Win32 error number.")
    p.add_argument("code", help="the error code, e.g. 0x80190194 or -2145844844")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, app: App) -> int:
    from agent.diagnostics import lookup_error, parse_hresult
    from agent.errors import LocalError

    try:
        code = parse_hresult(args.code)
    except ValueError as exc:
        raise LocalError(str(exc), advice="give the code as 0x80190194 or -2145844844") from None
    d = lookup_error(code)
    if args.json:
        app.print_json(d.as_dict())
        return 0
    head = d.hex
    if d.win32 is not None and d.name:
        head += f" (WIN32: {d.win32} {d.name})"
    elif d.name:
        head += f" ({d.name})"
    app.print(f"{head} -- {d.hresult} ({d.signed})")
    app.print(f"Error message text: {d.message or 'Unknown error code'}")
    return 0
