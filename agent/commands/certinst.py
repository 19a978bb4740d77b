"""`dmagent certinst`: one enrollment attempt for a SCEP node, like `dmcertinst.exe`."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.base import App, add_json_flag


def register(sub: Any) -> None:
    # add_help=False: -h is dmcertinst's hive switch, so help is --help only.
    p = sub.add_parser(
        "certinst", add_help=False,
        help="run one enrollment attempt for a SCEP node (like dmcertinst.exe)",
        description="Run one enrollment attempt for a ClientCertificateInstall SCEP node, with "
                    "the arguments the enrollment task passes (dmcertinst.exe -s -k KEY -h "
                    "HKLM -t UNIQUEID). Reads the Install key and the sealed Challenge, makes "
                    "the key (TPM or software per KeyProtection), enrolls over SCEP, installs "
                    "the certificate and writes Status/ErrorCode/CertThumbprint and events. "
                    "Exit 0 when the certificate is installed, 1 when the attempt failed.")
    p.add_argument("--help", action="help", help="show this help message and exit")
    p.add_argument("-s", dest="silent", action="store_true",
                   help="accepted for dmcertinst compatibility (the task passes it)")
    p.add_argument("-k", dest="key", required=True, metavar="KEY",
                   help=r"the Install key without the hive, e.g. "
                        r"'Software\Microsoft\SCEP\MS DM Server\<UniqueID>\Install'")
    p.add_argument("-h", dest="hive", required=True, choices=["HKLM", "HKCU"],
                   type=str.upper, help="HKLM (device certificate) or HKCU (user certificate)")
    p.add_argument("-t", dest="unique_id", required=True, metavar="UNIQUEID",
                   help="the SCEP node's UniqueID")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, app: App) -> int:
    import asyncio

    from agent.certinst import Certinst, CertinstRequest

    req = CertinstRequest(install_key=args.key.strip().strip("\\"), hive=args.hive,
                          unique_id=args.unique_id)
    outcome = asyncio.run(Certinst(app.ctx).run(req))
    if args.json:
        app.print_json(outcome.as_dict())
    else:
        state = "installed" if outcome.ok else f"failed ({outcome.as_dict()['error_code']})"
        app.print(f"{outcome.unique_id}: attempt {outcome.attempt}/{outcome.attempts} {state}")
        if outcome.thumbprint:
            app.print(f"  thumbprint: {outcome.thumbprint}")
        if not outcome.ok:
            app.print(f"  {outcome.message}")
        if outcome.final and not outcome.ok:
            app.print("  last attempt: the Challenge and the task were deleted")
    return 0 if outcome.ok else 1
