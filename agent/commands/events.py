"""`dmagent events`: the diagnostic event log (Windows' DeviceManagement-Enterprise-Diagnostics-
Provider/Admin channel), optionally followed as it grows."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.commands.base import App, add_json_flag


def register(sub: Any) -> None:
    p = sub.add_parser(
        "events", help="show diagnostic events (306, 36, 309, 39, 307, 32)",
        description="Show the device's diagnostic events. IDs mirror the Windows "
                    "DeviceManagement-Enterprise-Diagnostics-Provider/Admin log: 306 CspExecute, "
                    "36 request generated, 309 InstallFromRegEntries, 39 installed, "
                    "307 LogError, 32 enroll failed.")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    p.add_argument("--id", type=int, action="append", dest="ids", metavar="ID",
                   help="only these event IDs (repeatable)")
    p.add_argument("-n", "--last", type=int, metavar="N", help="only the last N events")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, app: App) -> int:
    log = app.ctx.events
    if args.follow:
        for ev in log.follow():
            if not args.ids or ev.event_id in args.ids:
                _emit(app, ev, args.json, stream=True)
                app.stdout.flush()
        return 0
    events = [ev for ev in log.read() if not args.ids or ev.event_id in args.ids]
    if args.last:
        events = events[-args.last:]
    if args.json:
        app.print_json([ev.as_dict() for ev in events])
    else:
        for ev in events:
            _emit(app, ev, False)
    return 0


def _emit(app: App, ev: Any, as_json: bool, stream: bool = False) -> None:
    if as_json:  # one object per line when following, so consumers can read line by line
        app.print(json.dumps(ev.as_dict(), ensure_ascii=False))
    else:
        app.print(f"{ev.time}  {ev.level:<11}  {ev.event_id:>3}  {ev.message}")
