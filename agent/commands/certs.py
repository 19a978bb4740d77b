"""`dmagent certs list|show|export`: the certificate stores (My, CA, Root) per scope."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from agent.commands.base import App, add_json_flag


def register(sub: Any) -> None:
    p = sub.add_parser(
        "certs", help="list, show and export installed certificates",
        description="Certificates live in the registry store where Windows keeps them "
                    "(SystemCertificates\\<store>\\Certificates\\<SHA1>), each linked to its "
                    "key (software or TPM).")
    csub = p.add_subparsers(dest="certs_cmd", required=True, metavar="{list,show,export}")
    ls = csub.add_parser("list", help="certificates in every store (or one)")
    ls.add_argument("--scope", choices=["device", "user"], help="only this scope")
    ls.add_argument("--store", choices=["My", "CA", "Root"], help="only this store")
    add_json_flag(ls)
    ls.set_defaults(func=run_list)
    show = csub.add_parser("show", help="one certificate in full")
    show.add_argument("thumbprint")
    add_json_flag(show)
    show.set_defaults(func=run_show)
    ex = csub.add_parser(
        "export", help="export a certificate (PEM), with its key when possible",
        description="--format pem writes the certificate (and chain); pkcs12 adds the "
                    "software key (only when it was created exportable); tss2 writes the TPM "
                    "key blob in the TSS2 PRIVATE KEY format (usable by tpm2-openssl on the "
                    "same TPM) next to the certificate.")
    ex.add_argument("thumbprint")
    ex.add_argument("--format", choices=["pem", "pkcs12", "tss2"], default="pem")
    ex.add_argument("--out", required=True, help="output file (tss2: FILE.crt + FILE.key)")
    ex.add_argument("--password-file", help="PKCS#12 password file (default: no password)")
    ex.set_defaults(func=run_export)


def _selected(args: argparse.Namespace) -> list[tuple[Any, Any]]:
    from agent.certstore import Scope, StoreName

    scopes = [Scope(args.scope)] if args.scope else list(Scope)
    stores = [StoreName(args.store)] if args.store else list(StoreName)
    return [(sc, st) for sc in scopes for st in stores]


def run_list(args: argparse.Namespace, app: App) -> int:
    from agent.certstore import CertStore

    store = CertStore(app.ctx.registry)
    certs = [c for sc, st in _selected(args) for c in store.list_store(sc, st)]
    if args.json:
        app.print_json([c.summary() for c in certs])
        return 0
    if not certs:
        app.print("no certificates")
    for c in certs:
        app.print(f"[{c.scope.value}/{c.store.value}] {c.thumbprint}  {c.subject}  "
                  f"expires {c.not_after:%Y-%m-%d}" + (f"  key {c.key_store}" if c.key_id else ""))
    return 0


def run_show(args: argparse.Namespace, app: App) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from agent.certstore import CertStore

    cert = CertStore(app.ctx.registry).find(args.thumbprint)
    info: dict[str, Any] = cert.summary()
    info["pem"] = cert.cert.public_bytes(Encoding.PEM).decode()
    info["extensions"] = [e.oid.dotted_string + (f" ({e.oid._name})" if e.oid._name else "")
                          for e in cert.cert.extensions]
    if args.json:
        app.print_json(info)
    else:
        for key, value in info.items():
            if key != "pem":
                app.print(f"{key:<11} {value}")
        app.print(info["pem"].rstrip())
    return 0


def run_export(args: argparse.Namespace, app: App) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from agent.certstore import CertStore
    from agent.errors import LocalError

    cert = CertStore(app.ctx.registry).find(args.thumbprint)
    pem = cert.cert.public_bytes(Encoding.PEM)
    out = Path(args.out)
    if args.format == "pem":
        _write(out, pem, 0o644)
        return 0
    if not cert.key_id:
        raise LocalError(f"certificate {cert.thumbprint} has no private key linked")
    if args.format == "tss2":
        if cert.key_store != "tpm":
            raise LocalError("tss2 export is for TPM keys; this key is a software key",
                             advice="use --format pkcs12 (exportable software keys only)")
        blob = app.config.keys_dir / "tpm" / f"{cert.key_id}.tss2.pem"
        if not blob.exists():
            raise LocalError(f"the TPM key blob {blob} is missing")
        _write(out.with_suffix(".crt"), pem, 0o644)
        _write(out.with_suffix(".key"), blob.read_bytes(), 0o600)
        return 0
    if cert.key_store != "software":
        raise LocalError("a TPM key never leaves the TPM: PKCS#12 export is impossible",
                         advice="use --format tss2 to export the wrapped key blob")
    return _export_pkcs12(app, cert, out, args.password_file)


def _export_pkcs12(app: App, cert: Any, out: Path, password_file: str | None) -> int:
    import secrets

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    key = app.ctx.keystore("software").load(cert.key_id)
    transient = secrets.token_bytes(16)
    pkcs8 = key.export_pkcs8(transient)  # raises NTE_BAD_KEY_STATE when not exportable
    private = serialization.load_pem_private_key(pkcs8, transient)
    password = Path(password_file).read_bytes().strip() if password_file else None
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    data = pkcs12.serialize_key_and_certificates(
        cert.thumbprint.encode(), private, cert.cert, None, encryption)  # type: ignore[arg-type]
    _write(out, data, 0o600)
    return 0


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
