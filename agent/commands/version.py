"""`dmagent version`: the agent's version and what it found on this machine."""

from __future__ import annotations

import argparse
import platform
import shutil
from typing import Any

from agent.commands.base import App, add_json_flag


def register(sub: Any) -> None:
    p = sub.add_parser("version", help="show versions of the agent, its libraries and tools")
    add_json_flag(p)
    p.set_defaults(func=run)


def _dist_version(name: str) -> str | None:
    from importlib import metadata  # ~17 ms: only this command needs it

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run(args: argparse.Namespace, app: App) -> int:
    from agent import __version__

    info = {
        "dmagent": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {n: _dist_version(n) for n in (
            "cryptography", "asn1crypto", "lxml", "httpx", "apscheduler", "tpm2-pytss")},
        "tools": {n: shutil.which(n) for n in ("swtpm", "scepserver", "scepclient")},
    }
    if args.json:
        app.print_json(info)
        return 0
    app.print(f"dmagent {info['dmagent']} (Python {info['python']}, {info['platform']})")
    for name, ver in info["libraries"].items():  # type: ignore[attr-defined]
        app.print(f"  {name:<13} {ver or 'not installed'}")
    for name, path in info["tools"].items():  # type: ignore[attr-defined]
        app.print(f"  {name:<13} {path or 'not found'}")
    return 0
