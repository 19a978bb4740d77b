"""`dmagent tasks list|show|run`: the enrollment tasks (the Task Scheduler's EnterpriseMgmt
folder on Windows)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from agent.commands.base import App, add_json_flag


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tasks", help="list, show and run the enrollment tasks",
        description="Enrollment tasks are created when the MDM server sends Exec "
                    ".../Install/Enroll; each runs `dmagent certinst` up to 3 times, 1 minute "
                    "apart (EnterpriseMgmt\\<EnrollmentId>\\<UniqueID><SID> on Windows).")
    tsub = p.add_subparsers(dest="tasks_cmd", required=True, metavar="{list,show,run}")
    ls = tsub.add_parser("list", help="pending tasks with attempts made and next run")
    add_json_flag(ls)
    ls.set_defaults(func=run_list)
    show = tsub.add_parser("show", help="one task in full")
    show.add_argument("name", help="the task name or its UniqueID")
    add_json_flag(show)
    show.set_defaults(func=run_show)
    now = tsub.add_parser("run", help="run one attempt now (through the daemon when it runs)")
    now.add_argument("name", help="the task name or its UniqueID")
    add_json_flag(now)
    now.set_defaults(func=run_now)


def _find(app: App, name: str) -> Any:
    from agent.errors import NotFoundError
    from agent.taskstore import TaskStore

    matches = [t for t in TaskStore(app.ctx.registry).list()
               if name.casefold() in (t.name.casefold(), t.unique_id.casefold())]
    if not matches:
        raise NotFoundError(f"no task named {name!r}",
                            advice="`dmagent tasks list` shows the pending tasks")
    if len(matches) > 1:
        from agent.errors import LocalError

        raise LocalError(f"{name!r} matches {len(matches)} tasks (device and user scope)",
                         advice="give the full task name (UniqueID + SID)")
    return matches[0]


def _as_dict(task: Any) -> dict[str, Any]:
    return {"enrollment_id": task.enrollment_id, "name": task.name, "id": task.id,
            "unique_id": task.unique_id, "hive": task.hive, "action": task.action,
            "attempts": task.attempts, "attempts_made": task.attempts_made,
            "interval_seconds": task.interval_seconds,
            "next_run": datetime.fromtimestamp(task.next_run_ms / 1000, UTC).isoformat(),
            "folder": f"\\Microsoft\\Windows\\EnterpriseMgmt\\{task.enrollment_id}\\"}


def run_list(args: argparse.Namespace, app: App) -> int:
    from agent.taskstore import TaskStore

    tasks = [_as_dict(t) for t in TaskStore(app.ctx.registry).list()]
    if args.json:
        app.print_json(tasks)
        return 0
    if not tasks:
        app.print("no pending enrollment tasks")
    for t in tasks:
        app.print(f"{t['name']}  attempts {t['attempts_made']}/{t['attempts']}  "
                  f"next run {t['next_run']}")
    return 0


def run_show(args: argparse.Namespace, app: App) -> int:
    task = _as_dict(_find(app, args.name))
    if args.json:
        app.print_json(task)
    else:
        for key, value in task.items():
            app.print(f"{key:<17} {value}")
    return 0


def run_now(args: argparse.Namespace, app: App) -> int:
    import asyncio

    from agent.certinst import Certinst, CertinstRequest
    from agent.control import request
    from agent.statelock import StateLock

    task = _find(app, args.name)
    lock = StateLock(app.config.state_dir / "dmagent.lock")
    if lock.holder_pid() is not None:  # the daemon owns the schedule: let it run the attempt
        answer = asyncio.run(request(app.config.state_dir, {
            "cmd": "run-task", "enrollment_id": task.enrollment_id, "name": task.name}))
        outcome: dict[str, Any] = {"via": "daemon", **answer}
    else:
        result = asyncio.run(Certinst(app.ctx).run(
            CertinstRequest(task.install_key, task.hive, task.unique_id)))
        outcome = {"via": "direct", "ok": result.ok, **result.as_dict()}
    if args.json:
        app.print_json(outcome)
    else:
        app.print(f"{task.name}: {'ok' if outcome.get('ok') else 'failed'} "
                  f"({outcome['via']})" + (f": {outcome['message']}" if outcome.get("message")
                                           else ""))
    return 0 if outcome.get("ok") else 1
