"""`dmagent status`: the device at a glance — enrollments, last sync, every SCEP node with
Status/ErrorCode/thumbprint/expiry, pending tasks, whether the daemon runs."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.base import App, add_json_flag

_STATUS_TEXT = {1: "installed", 2: "pending", 16: "failed", 32: "in progress"}


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="accounts, last sync, SCEP nodes, pending tasks")
    add_json_flag(p)
    p.set_defaults(func=run)


def collect(app: App) -> dict[str, Any]:
    from agent.certstore import CertStore, Scope, StoreName
    from agent.diagnostics import format_hex, lookup_error
    from agent.enrollment import EnrollmentStore
    from agent.errors import DmAgentError
    from agent.statelock import StateLock
    from agent.taskstore import TaskStore

    ctx = app.ctx
    reg = ctx.registry
    store = EnrollmentStore(reg)
    certs = CertStore(reg)
    nodes = []
    for scope, root in ((Scope.DEVICE, r"HKLM\Software\Microsoft\SCEP"),
                        (Scope.USER, r"HKCU\Software\Microsoft\SCEP")):
        if not reg.key_exists(root):
            continue
        for provider in reg.subkeys(root):
            for uid in reg.subkeys(f"{root}\\{provider}"):
                node = f"{root}\\{provider}\\{uid}"
                status = reg.query(node, "Status")
                error = reg.query(node, "ErrorCode")
                thumb = reg.query(node, "CertThumbprint")
                entry: dict[str, Any] = {
                    "scope": scope.value, "provider": provider, "unique_id": uid,
                    "status": status, "status_text": _STATUS_TEXT.get(
                        status if isinstance(status, int) else -1, "unknown"),
                    "error_code": format_hex(error) if isinstance(error, int) else None,
                    "error_text": lookup_error(error).message if isinstance(error, int) and
                    error else "",
                    "thumbprint": thumb if isinstance(thumb, str) else "",
                    "respondent": reg.query(node, "RespondentServerUrl") or "",
                    "expires": None}
                if entry["thumbprint"]:
                    try:
                        cert = certs.get(scope, StoreName.MY, entry["thumbprint"])
                        entry["expires"] = cert.not_after.isoformat()
                        entry["subject"] = cert.subject
                    except DmAgentError:
                        entry["missing_certificate"] = True
                nodes.append(entry)
    holder = StateLock(ctx.config.state_dir / "dmagent.lock").holder_pid()
    return {
        "device": {"device_id": ctx.device.device_id, "name": ctx.device.name,
                   "user_sid": ctx.device.user_sid, "state_dir": str(ctx.config.state_dir)},
        "daemon": {"running": holder is not None, "pid": holder},
        "enrollments": [{"enrollment_id": e.enrollment_id, "provider_id": e.provider_id,
                         "account_id": e.account_id, "server_url": e.server_url,
                         "last_session": store.last_session(e)} for e in store.list()],
        "scep_nodes": nodes,
        "tasks": [{"name": t.name, "attempts_made": t.attempts_made, "attempts": t.attempts,
                   "next_run_ms": t.next_run_ms} for t in TaskStore(reg).list()],
    }


def run(args: argparse.Namespace, app: App) -> int:
    info = collect(app)
    if args.json:
        app.print_json(info)
        return 0
    d = info["device"]
    daemon = info["daemon"]
    app.print(f"Device      {d['name']}  (DevId {d['device_id']})")
    app.print(f"State       {d['state_dir']}")
    app.print("Daemon      " + (f"running (pid {daemon['pid']})" if daemon["running"]
                                else "not running"))
    if not info["enrollments"]:
        app.print("Enrollments none (enroll with `dmagent sync --once --server URL`)")
    for e in info["enrollments"]:
        last = e["last_session"]
        app.print(f"Enrollment  {e['enrollment_id']}  {e['provider_id']}  {e['server_url']}")
        app.print(f"  last sync {last.get('ServerLastAccessTime', 'never')}"
                  f" ({last.get('LastSessionResult', '-')})")
    app.print(f"SCEP nodes  {len(info['scep_nodes'])}")
    for n in info["scep_nodes"]:
        app.print(f"  [{n['scope']}] {n['unique_id']}")
        line = f"    Status {n['status']} ({n['status_text']})  ErrorCode {n['error_code']}"
        if n["error_text"]:
            line += f" {n['error_text']}"
        app.print(line)
        if n["thumbprint"]:
            tail = (f"expires {n['expires']}" if n["expires"]
                    else "certificate missing from the store")
            app.print(f"    {n['thumbprint']}  {tail}")
    app.print(f"Tasks       {len(info['tasks'])} pending")
    for t in info["tasks"]:
        app.print(f"  {t['name']}  attempts {t['attempts_made']}/{t['attempts']}")
    return 0
