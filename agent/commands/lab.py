"""`dmagent lab …`: the reference MDM server (OMA-DM, Intune-style SCEP profile delivery, dynamic
challenges), its CSR validator for micromdm scepserver, and the state behind them.

The lab directory (`--dir`, else $DMAGENT_LAB_DIR, else `<state dir>/lab`) holds everything; see
`lab/labdir.py`. Commands that read or change state talk to a running `lab serve` through its
control API when one is running for that directory, else open the state database directly (it
is the single source of truth either way).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.commands.base import App, add_json_flag

if TYPE_CHECKING:
    from lab.control import Control
    from lab.labdir import LabDir


def register(sub: Any) -> None:
    p = sub.add_parser(
        "lab", help="reference MDM server, SCEP CA and the end-to-end demo",
        description="A scriptable OMA-DM test server that delivers SCEP profiles like Intune "
                    "(dynamic challenges, follow-up, renewal), plus the CSR validator micromdm "
                    "scepserver runs through -csrverifierexec.")
    lsub = p.add_subparsers(dest="lab_cmd", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = lsub.add_parser(name, help=help_, description=help_)
        c.add_argument("--dir", "--lab-dir", dest="lab_dir", metavar="DIR",
                       help="the lab directory (default: $DMAGENT_LAB_DIR, else <state dir>/lab)")
        c.set_defaults(func=func)
        return c

    c = cmd("init", "create a lab directory: TLS CA, server certificate, challenge signing "
                    "key, control token, example profiles, CSR validator wrapper", run_init)
    c.add_argument("--force", action="store_true", help="re-create keys and state")
    c.add_argument("--account-id", help="the MDM account id in node names (default: random)")
    c.add_argument("--scep-url", help="default SCEP ServerURL for profiles")
    c.add_argument("--scep-ca", help="CA certificate file: default trusted root and "
                                     "CAThumbprint")
    c.add_argument("--scep-depot", help="micromdm depot directory (issued certificates)")
    c.add_argument("--auth", choices=("none", "md5"), help="SyncML authentication")
    c.add_argument("--no-examples", action="store_true", help="do not copy example profiles")
    add_json_flag(c)

    c = cmd("verify-csr", "validate a CSR (PEM or DER on stdin) like the Intune connector; "
                          "exit 0 only when it may be issued (micromdm -csrverifierexec)",
            run_verify_csr)
    c.add_argument("--transaction-id", default=os.environ.get("TRANSACTIONID"),
                   help="the SCEP transaction id, for the CRS record (default: $TRANSACTIONID)")
    add_json_flag(c)

    c = cmd("crs", "certificate request status records (every validation decision)", run_crs)
    c.add_argument("--device", help="only this device")
    add_json_flag(c)

    c = cmd("serve", "run the lab's OMA-DM server over HTTPS on 127.0.0.1 (foreground)",
            run_serve)
    c.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    c.add_argument("--scep-url", help="default SCEP ServerURL for profiles (saved in lab.toml)")
    c.add_argument("--scep-ca", help="CA certificate file: default trusted root and "
                                     "CAThumbprint (saved)")
    c.add_argument("--scep-depot", help="micromdm depot directory, to find issued certificates "
                                        "for renewal (saved)")

    c = cmd("status", "the lab's settings, counts and whether a server is running", run_status)
    add_json_flag(c)

    c = cmd("devices", "devices the lab knows (connected or registered)", run_devices)
    add_json_flag(c)

    c = cmd("set-device", "register a device or change what the lab knows about it (the "
                          "values profile variables expand from)", run_set_device)
    c.add_argument("device", help="the DeviceID (SyncHdr Source LocURI)")
    c.add_argument("--name", help="{{DeviceName}}")
    c.add_argument("--upn", help="{{UserPrincipalName}} (user profiles need one)")
    c.add_argument("--serial", help="{{SerialNumber}}")
    c.add_argument("--aad-device-id", help="{{AAD_Device_ID}} (default: the DeviceID)")
    c.add_argument("--groups", help="comma-separated group names (replaces the list)")
    c.add_argument("--auth-password", help="this device's syncml:auth-md5 secret")
    add_json_flag(c)

    c = cmd("profiles", "the SCEP profiles and their assignments", run_profiles)
    add_json_flag(c)

    for name, func, verb in (("assign", run_assign, "assign"),
                             ("unassign", run_unassign, "unassign")):
        c = cmd(name, f"{verb} a profile (id, name or file stem) to a device or a group "
                      "('*' = all devices)", func)
        c.add_argument("profile")
        target = c.add_mutually_exclusive_group(required=True)
        target.add_argument("--device")
        target.add_argument("--group")
        add_json_flag(c)

    c = cmd("show", "one device: what it reported, deliveries, queue, sessions, CRS", run_show)
    c.add_argument("device")
    add_json_flag(c)

    c = cmd("enqueue", "queue raw SyncML commands for a device's next session", run_enqueue)
    c.add_argument("device")
    c.add_argument("file", help="XML file with one or more commands ('-' for stdin)")
    add_json_flag(c)

    c = cmd("command", "one queued/sent command with the Status and Results it got",
            run_command)
    c.add_argument("id", type=int)
    add_json_flag(c)

    c = cmd("messages", "the SyncML messages recorded for a device", run_messages)
    c.add_argument("device")
    c.add_argument("--session", help="only this SessionID")
    c.add_argument("--after", type=int, default=0, help="only messages after this id")
    add_json_flag(c)

    c = lsub.add_parser(
        "demo", help="the whole chain (agent ↔ lab MDM ↔ SCEP CA) on this machine",
        description="Start swtpm, the lab MDM over HTTPS and micromdm scepserver wired to the "
                    "lab's challenge validator; assign a device profile (TPM key) and a user "
                    "profile (software key); run the agent daemon until both certificates are "
                    "installed and reported; print a summary; stop everything it started. "
                    "Exit 0 when both enrollments were installed and reported.")
    c.add_argument("--dir", default="demo-state", metavar="DIR",
                   help="where the demo keeps its files (re-created; default: ./demo-state)")
    c.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="give up after S seconds (default 120)")
    add_json_flag(c)
    c.set_defaults(func=run_demo)


# --- helpers -----------------------------------------------------------------------------------

def lab_dir(args: argparse.Namespace, app: App) -> LabDir:
    from lab.labdir import LabDir

    if args.lab_dir:
        return LabDir(Path(args.lab_dir))
    if os.environ.get("DMAGENT_LAB_DIR"):
        return LabDir(Path(os.environ["DMAGENT_LAB_DIR"]))
    return LabDir(app.config.state_dir / "lab")


def open_lab(args: argparse.Namespace, app: App) -> LabDir:
    from agent.errors import ConfigError
    from lab.labdir import LabConfigError

    lab = lab_dir(args, app)
    try:
        lab.config()
    except LabConfigError as exc:
        raise ConfigError(str(exc), advice="create one with `dmagent lab init --dir DIR`") \
            from None
    return lab


def control(args: argparse.Namespace, app: App) -> Control:
    from lab.control import connect

    return connect(open_lab(args, app))


def _call(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a control operation, turning its errors into the agent's (exit codes, hints)."""
    from agent.errors import LocalError, NotFoundError
    from lab.control import ControlError, ControlNotFound

    try:
        return func(*args, **kwargs)
    except ControlNotFound as exc:
        raise NotFoundError(exc.message) from None
    except ControlError as exc:
        raise LocalError(exc.message) from None


def _fmt_time(value: object) -> str:
    if value is None:
        return "-"
    return str(value)


# --- handlers ----------------------------------------------------------------------------------

def run_init(args: argparse.Namespace, app: App) -> int:
    from agent.errors import ConfigError
    from lab.labdir import LabConfigError, init_lab

    lab = lab_dir(args, app)
    changes: dict[str, Any] = {}
    for key in ("scep_url", "scep_ca", "scep_depot"):
        value = getattr(args, key)
        if value:
            changes[key] = str(Path(value).resolve()) if key != "scep_url" else value
    try:
        lab = init_lab(lab.path, force=args.force, account_id=args.account_id,
                       copy_examples=not args.no_examples, auth=args.auth or "none", **changes)
    except LabConfigError as exc:
        raise ConfigError(str(exc)) from None
    cfg = lab.config()
    info = {"dir": str(lab.path), "account_id": cfg.account_id,
            "ca_bundle": str(lab.ca_cert_path), "token": str(lab.token_path),
            "csr_verifier": str(lab.verifier_path), "profiles": str(lab.profiles_path),
            "auth": cfg.session.auth}
    if args.json:
        app.print_json(info)
    else:
        app.print(f"lab directory   {info['dir']}")
        app.print(f"account id      {info['account_id']}")
        app.print(f"TLS CA bundle   {info['ca_bundle']}   (agent: server.ca_bundle)")
        app.print(f"profiles        {info['profiles']}")
        app.print(f"CSR verifier    {info['csr_verifier']}   "
                  f"(scepserver -csrverifierexec, without -challenge)")
        app.print(f"control token   {info['token']}")
    return 0


def run_verify_csr(args: argparse.Namespace, app: App) -> int:
    from lab.pki import utcnow
    from lab.validator import verify_csr

    lab = open_lab(args, app)
    data = sys.stdin.buffer.read()
    verdict = verify_csr(lab, data, now=utcnow(), transaction_id=args.transaction_id)
    if args.json:
        app.print_json({"ok": verdict.ok, "reason": verdict.reason and verdict.reason.value,
                        "detail": verdict.detail, "hresult": f"0x{verdict.hresult:08X}",
                        "crs_id": verdict.crs_id})
    else:
        # stderr: micromdm discards the verifier's output; a person running it by hand sees it
        print(verdict.line(), file=sys.stderr)
    return 0 if verdict.ok else 1


def run_crs(args: argparse.Namespace, app: App) -> int:
    rows = _call(control(args, app).crs, device=args.device)
    if args.json:
        app.print_json(rows)
        return 0
    if not rows:
        app.print("no certificate requests recorded")
        return 0
    for r in rows:
        result = "ok" if r["status"] != "refused" else f"{r['reason']} 0x{r['hresult']:08X}"
        app.print(f"#{r['id']} {r['at']} {r['status']:<8} device={r['device_id'] or '?'} "
                  f"{result}")
        app.print(f"    request {r['request_id'] or '-'}")
        if r.get("thumbprint"):
            app.print(f"    certificate {r['thumbprint']} serial {r['serial']} "
                      f"expires {_fmt_time(r['expires'])}")
        app.print(f"    {r['detail']}")
    return 0


def run_serve(args: argparse.Namespace, app: App) -> int:
    from agent.errors import ConfigError, LocalError

    lab = open_lab(args, app)
    changes = {k: (v if k == "scep_url" else str(Path(v).resolve()))
               for k in ("scep_url", "scep_ca", "scep_depot")
               if (v := getattr(args, k))}
    if changes:
        lab.update_config(**changes)
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("`lab serve` needs uvicorn", advice="pip install 'dmagent[lab]'") \
            from None
    from lab.server import serve_forever

    def ready(run: Any) -> None:
        cfg = lab.config()
        print(f"lab MDM server  {run.mdm_url}", flush=True)
        print(f"control API     {run.base_url}/lab/  (token: {lab.token_path})", flush=True)
        print(f"TLS CA bundle   {lab.ca_cert_path}", flush=True)
        print(f"SCEP URL        {cfg.scep_url or '(not set: --scep-url)'}", flush=True)

    try:
        serve_forever(lab, port=args.port, on_ready=ready,
                      log_level="info" if args.verbose else "warning")
    except OSError as exc:
        raise LocalError(f"cannot serve on 127.0.0.1:{args.port}: {exc}") from None
    return 0


def run_status(args: argparse.Namespace, app: App) -> int:
    info = _call(control(args, app).status)
    if args.json:
        app.print_json(info)
        return 0
    for key in ("dir", "account_id", "scep_url", "scep_ca", "scep_depot", "devices",
                "profiles"):
        app.print(f"{key:<11} {info.get(key) or '-'}")
    server = info.get("server")
    app.print(f"{'server':<11} {server['mdm_url'] if server else 'not running'}")
    return 0


def run_devices(args: argparse.Namespace, app: App) -> int:
    rows = _call(control(args, app).devices)
    if args.json:
        app.print_json(rows)
        return 0
    if not rows:
        app.print("no devices yet")
        return 0
    app.print(f"{'DEVICE':<40} {'NAME':<20} {'UPN':<28} {'SESSIONS':>8}  LAST SESSION")
    for d in rows:
        name = d["name"] or (d["info"] or {}).get("DeviceName") or "-"
        app.print(f"{d['device_id']:<40} {name:<20} {d['upn'] or '-':<28} "
                  f"{d['sessions']:>8}  {_fmt_time(d['last_session'])}")
    return 0


def run_set_device(args: argparse.Namespace, app: App) -> int:
    fields: dict[str, Any] = {k: v for k in ("name", "upn", "serial", "aad_device_id",
                                             "auth_password") if (v := getattr(args, k))}
    if args.groups is not None:
        fields["groups"] = [g.strip() for g in args.groups.split(",") if g.strip()]
    row = _call(control(args, app).set_device, args.device, **fields)
    if args.json:
        app.print_json(row)
    else:
        app.print(f"{row['device_id']}: name={row['name'] or '-'} upn={row['upn'] or '-'} "
                  f"groups={','.join(row['groups']) or '-'}")
    return 0


def run_profiles(args: argparse.Namespace, app: App) -> int:
    rows = _call(control(args, app).profiles)
    if args.json:
        app.print_json(rows)
        return 0
    for p in rows:
        targets = ", ".join(f"{a['kind']}:{a['target']}" for a in p["assignments"]) or \
            "not assigned"
        app.print(f"{p['name']}  ({p['scope']}, {p['id']})")
        app.print(f"    {p['unique_id']}")
        app.print(f"    renewal at {p['renewal_threshold']}% left; {targets}")
    return 0


def _assign(args: argparse.Namespace, app: App, op: str) -> int:
    ctl = control(args, app)
    res = _call(getattr(ctl, op), args.profile, device=args.device, group=args.group)
    if args.json:
        app.print_json(res)
    else:
        done = "assigned to" if op == "assign" else "unassigned from"
        note = "" if res["changed"] else " (no change)"
        app.print(f"profile {res['profile_id']} {done} {res['kind']} {res['target']}{note}")
    return 0


def run_assign(args: argparse.Namespace, app: App) -> int:
    return _assign(args, app, "assign")


def run_unassign(args: argparse.Namespace, app: App) -> int:
    return _assign(args, app, "unassign")


def run_show(args: argparse.Namespace, app: App) -> int:
    d = _call(control(args, app).device, args.device)
    if args.json:
        app.print_json(d)
        return 0
    info = d["info"] or {}
    app.print(f"device      {d['device_id']}")
    app.print(f"name        {d['name'] or info.get('DeviceName') or '-'}")
    app.print(f"upn         {d['upn'] or '-'}   groups {','.join(d['groups']) or '-'}")
    app.print(f"sessions    {d['sessions']}  last {_fmt_time(d['last_session'])}")
    app.print(f"assigned    {', '.join(d['assigned']) or '-'}")
    for dl in d["deliveries"]:
        app.print(f"profile     {dl['profile_id']}  [{dl['state']}] attempts={dl['attempts']}")
        app.print(f"    node    {dl['unique_id']}")
        err = dl["error_code"]
        err_text = "-" if err is None else f"{err} (0x{err & 0xFFFFFFFF:08X})"
        app.print(f"    device  Status={dl['status'] if dl['status'] is not None else '-'} "
                  f"ErrorCode={err_text} thumbprint={dl['thumbprint'] or '-'}")
        if dl["not_after"]:
            app.print(f"    cert    valid until {dl['not_after']}, renewal from "
                      f"{dl['renew_at']}")
        app.print(f"    note    {dl['detail'] or '-'}")
    if d["queued"]:
        app.print(f"queued      {len(d['queued'])} command(s): "
                  f"{', '.join(str(c['id']) for c in d['queued'])}")
    for uri, r in sorted(d["reported"].items()):
        app.print(f"reported    {uri} = {r['value']}")
    return 0


def run_enqueue(args: argparse.Namespace, app: App) -> int:
    from agent.errors import LocalError

    if args.file == "-":
        xml = sys.stdin.read()
    else:
        try:
            xml = Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise LocalError(f"cannot read {args.file}: {exc}") from None
    res = _call(control(args, app).enqueue, args.device, xml)
    if args.json:
        app.print_json(res)
    else:
        app.print(f"queued for {res['device_id']}: command id(s) "
                  f"{', '.join(map(str, res['ids']))}")
    return 0


def run_command(args: argparse.Namespace, app: App) -> int:
    c = _call(control(args, app).command, args.id)
    if args.json:
        app.print_json(c)
        return 0
    app.print(f"command {c['id']} for {c['device_id']}: {c['state']} (origin {c['origin']})")
    if c["session_id"]:
        app.print(f"sent in session {c['session_id']} message {c['msg_id']} at {c['sent_at']}")
    for s in c["statuses"]:
        app.print(f"Status  {s['cmd']} CmdRef {s['cmd_ref']}: {s['code']}")
    for r in c["results"]:
        for item in r["items"]:
            app.print(f"Results {item.get('source')}: {item.get('data')}")
    app.print(c["xml"])
    return 0


def run_messages(args: argparse.Namespace, app: App) -> int:
    rows = _call(control(args, app).messages, args.device, session=args.session,
                 after=args.after)
    if args.json:
        app.print_json(rows)
        return 0
    for m in rows:
        arrow = "->" if m["direction"] == "in" else "<-"
        app.print(f"#{m['id']} {m['at']} {arrow} session {m['session_id']} msg "
                  f"{m['msg_id'] or '-'} (HTTP {m['http_status']})")
        app.print(m["body"] or "(empty body: end of session)")
    return 0


def run_demo(args: argparse.Namespace, app: App) -> int:
    import importlib

    from agent.errors import LocalError

    try:
        demo = importlib.import_module("lab.demo")  # the end-to-end demo (written by the lead)
    except ModuleNotFoundError as exc:
        if exc.name != "lab.demo":
            raise
        raise LocalError("`dmagent lab demo` is not available in this build yet") from None
    return int(demo.run(args, app))
