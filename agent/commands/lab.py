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
    rows = control(args, app).crs(device=args.device)
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
