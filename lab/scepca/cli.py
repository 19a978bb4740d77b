"""`python -m lab.scepca`: init, serve, approve, reject, revoke, list, faults, info.

    python -m lab.scepca init  --dir ./ca
    python -m lab.scepca serve --dir ./ca --mode ndes --challenge secret --pending manual
    python -m lab.scepca list  --dir ./ca --status pending
    python -m lab.scepca approve --dir ./ca <transaction-id>
    python -m lab.scepca faults --dir ./ca --add '503@PKCSReq:count=2'

Exit codes: 0 success, 1 the action failed (no such request, server not running), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_PORT = 9380


def _config(args: argparse.Namespace) -> Any:
    from lab.scepca.config import CAConfig, Mode, PendingPolicy
    from lab.scepca.policy import ExecVerifier, NoChallenge, StaticChallenge

    challenge = args.challenge or os.environ.get("LAB_SCEPCA_CHALLENGE", "")
    if args.challenge_file:
        challenge = Path(args.challenge_file).read_text().strip()
    verifier: Any
    if args.verifier_exec:
        verifier = ExecVerifier(shlex.split(args.verifier_exec), timeout=args.verifier_timeout)
    elif challenge:
        verifier = StaticChallenge(challenge)
    else:
        verifier = NoChallenge()
    notifier = None
    if args.notify:
        module, _, attr = args.notify.partition(":")
        notifier = getattr(importlib.import_module(module), attr or "notify")
    elif args.lab_state:
        from lab.scepca.notify import LabStateNotifier

        notifier = LabStateNotifier(Path(args.lab_state))
    crs_dir = None if args.crs_dir == "none" else (args.crs_dir or
                                                   str(Path(args.dir) /
                                                       "CertificateRequestStatus"))
    caps = tuple(c.strip() for c in args.caps.split(",") if c.strip()) if args.caps else None
    return CAConfig(mode=Mode(args.mode), caps=caps, enforce_caps=args.enforce_caps,
                    verifier=verifier, pending=PendingPolicy.parse(args.pending),
                    validity_days=args.validity_days, max_validity_days=args.max_validity_days,
                    allow_renewal=not args.no_renewal, max_clock_skew=args.max_clock_skew,
                    clock_offset=args.clock_offset, notifier=notifier, crs_dir=crs_dir)


def cmd_init(args: argparse.Namespace) -> int:
    from lab.scepca.ca import CAError, CertificateAuthority

    try:
        ca = CertificateAuthority.init(Path(args.dir), now=datetime.now(UTC),
                                       common_name=args.cn, ra_name=args.ra_name,
                                       force=args.force)
    except CAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CA created in {args.dir}\nsubject    {ca.cert.subject.rfc4514_string()}\n"
          f"thumbprint {ca.thumbprint}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lab.scepca.ca import CAError
    from lab.scepca.faults import FaultSet, FaultSpecError, parse_fault
    from lab.scepca.runner import build_app, serve_forever

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _config(args)
        faults = FaultSet([parse_fault(f) for f in args.fault or []])
        app = build_app(Path(args.dir), config, faults=faults,
                        token=args.token or os.environ.get("LAB_SCEPCA_TOKEN"))
    except (CAError, FaultSpecError, ValueError, OSError, ImportError, AttributeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        serve_forever(app, Path(args.dir), args.host, args.port, args.log_level)
    return 0


def _db(args: argparse.Namespace) -> Any:
    from lab.scepca.ca import CertificateAuthority
    from lab.scepca.db import CADatabase

    path = Path(args.dir)
    if not CertificateAuthority.exists(path):
        raise LookupError(f"no CA in {path}")
    return CADatabase(path / "ca.db")


def cmd_approve(args: argparse.Namespace) -> int:
    row = _db(args).approve(args.transaction_id, who="cli")
    print(f"approved {row.transaction_id} ({row.subject}); the next CertPoll gets the "
          "certificate")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    row = _db(args).reject(args.transaction_id, args.reason, who="cli")
    print(f"rejected {row.transaction_id} ({row.subject}): {row.reason}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    row = _db(args).revoke(int(args.serial.replace(":", ""), 16))
    print(f"revoked {row.serial} ({row.subject})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from lab.scepca.db import Status

    db = _db(args)
    if args.decisions:
        decisions = db.decisions(args.transaction_id)
        if args.json:
            print(json.dumps([d.__dict__ for d in decisions], indent=1))
        for d in [] if args.json else decisions:
            when = datetime.fromtimestamp(d.time, UTC).strftime("%Y-%m-%d %H:%M:%S")
            verdict = "accept" if d.accepted else "refuse"
            print(f"{when}  {d.transaction_id[:40]:40}  {d.decider:9} {verdict:6} {d.reason}")
        return 0
    rows = db.requests(Status(args.status) if args.status else None)
    if args.transaction_id:
        rows = [r for r in rows if r.transaction_id == args.transaction_id]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
        return 0
    for r in rows:
        state = r.status.value + (" (approved)" if r.approved and r.status.value == "pending"
                                  else "")
        print(f"{r.transaction_id[:40]:40}  {state:18} {r.serial or '-':42} {r.subject}"
              + (f"  [{r.reason}]" if r.status.value in ("rejected", "pending") else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lab.scepca.ca import CertificateAuthority
    from lab.scepca.runner import SERVER_FILE

    ca = CertificateAuthority.load(Path(args.dir))
    info: dict[str, Any] = {"subject": ca.cert.subject.rfc4514_string(),
                            "thumbprint": ca.thumbprint,
                            "ca_cert": str(Path(args.dir) / "ca.pem"),
                            "not_after": ca.cert.not_valid_after_utc.isoformat()}
    server = Path(args.dir) / SERVER_FILE
    if server.exists():
        info["server"] = json.loads(server.read_text())
    print(json.dumps(info, indent=1))
    return 0


def cmd_faults(args: argparse.Namespace) -> int:
    from lab.scepca.runner import SERVER_FILE, TOKEN_FILE

    directory = Path(args.dir)
    try:
        server = json.loads((directory / SERVER_FILE).read_text())
        token = (directory / TOKEN_FILE).read_text().strip()
    except OSError:
        print(f"error: no running server for {directory} (start `serve` first)",
              file=sys.stderr)
        return 1
    base = f"http://127.0.0.1:{server['port']}/lab-ca/faults"

    def call(method: str, url: str, data: Any = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(url, data=body, method=method, headers={  # noqa: S310
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our loopback
            return json.loads(resp.read())

    try:
        if args.clear:
            call("DELETE", base)
        if args.remove is not None:
            call("DELETE", f"{base}/{args.remove}")
        if args.add:
            call("POST", base, {"rules": [{"spec": s} for s in args.add]})
        rules = call("GET", base)["rules"]
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.code}: {exc.read().decode(errors='replace').strip()}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach the server at {base}: {exc}", file=sys.stderr)
        return 1
    for r in rules:
        left = "∞" if r["count"] is None else str(r["count"] - r["hits"])
        print(f"#{r['id']:<3} {r['spec']:45} hits {r['hits']:<4} left {left}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.scepca",
                                description="The lab SCEP CA (RFC 8894), with an NDES-like "
                                            "mode, PENDING approval and fault injection.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_dir(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--dir", required=True, help="the CA directory")
        return sp

    i = with_dir(sub.add_parser("init", help="create the root CA and the NDES RA pair"))
    i.add_argument("--cn", default="dmagent Lab Root CA")
    i.add_argument("--ra-name", default="LAB-NDES-MSCEP-RA")
    i.add_argument("--force", action="store_true", help="replace an existing CA")
    i.set_defaults(func=cmd_init)

    s = with_dir(sub.add_parser("serve", help="serve SCEP over HTTP (creates the CA if "
                                              "missing)"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 = any free port")
    s.add_argument("--mode", choices=("normal", "ndes"), default="normal")
    s.add_argument("--challenge", help="static challenge password (or LAB_SCEPCA_CHALLENGE)")
    s.add_argument("--challenge-file", help="read the static challenge from a file")
    s.add_argument("--verifier-exec", help="program that gets the DER CSR on stdin; exit 0 "
                                           "accepts (micromdm -csrverifierexec contract)")
    s.add_argument("--verifier-timeout", type=float, default=30.0)
    s.add_argument("--pending", default="none",
                   help="none | manual | after:SECONDS | polls:N")
    s.add_argument("--caps", help="comma-separated GetCACaps keywords (default per mode)")
    s.add_argument("--enforce-caps", action=argparse.BooleanOptionalAction, default=None,
                   help="badAlg for algorithms GetCACaps does not offer (default: NDES on)")
    s.add_argument("--validity-days", type=int, default=365)
    s.add_argument("--max-validity-days", type=int, default=825)
    s.add_argument("--no-renewal", action="store_true")
    s.add_argument("--max-clock-skew", type=float, default=86400.0)
    s.add_argument("--clock-offset", type=float, default=0.0,
                   help="run the CA's clock this many seconds ahead (badTime demos)")
    s.add_argument("--fault", action="append", help="fault rule, e.g. 503@PKCSReq:count=2")
    s.add_argument("--token", help="control endpoint token (or LAB_SCEPCA_TOKEN; else random,"
                                   " written to <dir>/control.token)")
    s.add_argument("--crs-dir", help="where CRS files go (default <dir>/"
                                     "CertificateRequestStatus; 'none' disables)")
    s.add_argument("--notify", help="module:function called with each CrsRecord")
    s.add_argument("--lab-state", help="the lab MDM server's state.db: Notify completes its "
                                       "CRS records (LabState.complete_crs)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    a = with_dir(sub.add_parser("approve", help="approve a PENDING request"))
    a.add_argument("transaction_id")
    a.set_defaults(func=cmd_approve)

    r = with_dir(sub.add_parser("reject", help="reject a PENDING request"))
    r.add_argument("transaction_id")
    r.add_argument("--reason", default="rejected by the operator")
    r.set_defaults(func=cmd_reject)

    v = with_dir(sub.add_parser("revoke", help="revoke an issued certificate (GetCRL)"))
    v.add_argument("serial", help="hex serial number")
    v.set_defaults(func=cmd_revoke)

    ls = with_dir(sub.add_parser("list", help="requests and certificates (or --decisions)"))
    ls.add_argument("--status", choices=("issued", "pending", "rejected", "revoked"))
    ls.add_argument("--transaction-id")
    ls.add_argument("--decisions", action="store_true", help="the policy decisions log")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    f = with_dir(sub.add_parser("faults", help="show or change the running server's faults"))
    f.add_argument("--add", action="append", help="fault rule to add (repeatable)")
    f.add_argument("--remove", type=int, help="rule id to remove")
    f.add_argument("--clear", action="store_true")
    f.set_defaults(func=cmd_faults)

    n = with_dir(sub.add_parser("info", help="the CA certificate, thumbprint and server"))
    n.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LookupError as exc:
        print(f"error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 1
