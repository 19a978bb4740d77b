"""`dmagent scep getcacaps|getcacert|enroll|renew`: a standalone SCEP client, like sscep.

The same code the dmcertinst job runs, driven from the command line: useful to test a SCEP
server (NDES, micromdm, a lab CA) exactly as the Windows client would talk to it. The
challenge is never echoed nor logged; give it with --challenge-file (`-` = stdin) or
$DMAGENT_SCEP_CHALLENGE rather than --challenge, which other users can see in `ps`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.commands.base import App, add_json_flag

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from agent.config import ScepConfig
    from agent.httpio import BlockingHttp
    from agent.scep.certificate import CertificateLike
    from agent.scep.enroll import EnrollOptions, EnrollResult
    from keystores.base import KeyHandle, KeyStore

CHALLENGE_ENV = "DMAGENT_SCEP_CHALLENGE"
_CIPHERS = ("des-cbc", "3des-cbc", "aes128-cbc", "aes192-cbc", "aes256-cbc")
_DIGESTS = ("sha1", "sha256", "sha384", "sha512")
T = TypeVar("T")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "scep", help="standalone SCEP client: getcacaps, getcacert, enroll, renew",
        description="Talk SCEP (RFC 8894) to a server the way the Windows MDM client does "
                    "(URL form, User-Agent, algorithm choice, checks). URL is the ServerURL "
                    "value: one URL or several separated by ';' (fallbacks).")
    # It logs nothing above debug: at the default level logging is not even loaded.
    p.set_defaults(logs_warnings=False)
    ssub = p.add_subparsers(dest="scep_cmd", required=True,
                            metavar="{getcacaps,getcacert,enroll,renew}")

    caps = ssub.add_parser("getcacaps", help="show the server's capabilities and our choice")
    _common(caps)
    caps.set_defaults(func=run_getcacaps)

    cacert = ssub.add_parser("getcacert", help="fetch the CA/RA certificates")
    _common(cacert)
    cacert.add_argument("--out", type=Path, metavar="FILE",
                        help="write the certificates (PEM) to FILE")
    cacert.add_argument("--thumbprint", metavar="SHA1",
                        help="fail unless a certificate has this SHA-1 thumbprint "
                             "(CAThumbprint check)")
    cacert.set_defaults(func=run_getcacert)

    enroll = ssub.add_parser("enroll", help="create a key and enroll it (PKCSReq)")
    _common(enroll)
    _request_options(enroll, subject_required=True)
    enroll.add_argument("--key-length", type=int, default=2048, choices=(1024, 2048, 3072, 4096),
                        help="RSA key size (KeyLength; default 2048)")
    enroll.add_argument("--out-key", type=Path, metavar="FILE",
                        help="also write the private key, encrypted PKCS#8 PEM (software key "
                             "store only; the key is created exportable)")
    enroll.add_argument("--out-key-password-file", type=Path, metavar="FILE",
                        help="password for --out-key (else $DMAGENT_KEY_PASSWORD)")
    enroll.set_defaults(func=run_enroll)

    renew = ssub.add_parser("renew", help="renew a certificate (RenewalReq signed with it)")
    _common(renew)
    _request_options(renew, subject_required=False)
    renew.add_argument("--cert", type=Path, required=True, metavar="FILE",
                       help="the certificate to renew (PEM or DER)")
    renew.add_argument("--key-id", required=True, help="its key in the key store")
    renew.add_argument("--reuse-key", action="store_true",
                       help="request the new certificate for the same key (default: a new "
                            "key of the same size)")
    renew.set_defaults(func=run_renew)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="SCEP server URL(s), ';'-separated (ServerURL)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--windows-url-form", dest="windows_url_form", action="store_true",
                      default=None, help="append /pkiclient.exe and send message=default "
                                         "like Windows, falling back to the URL as given on "
                                         "404 (default: scep.windows_url_form)")
    form.add_argument("--plain-url", dest="windows_url_form", action="store_false",
                      help="use the URL exactly as given")
    p.add_argument("--timeout", type=float, help="HTTP timeout in seconds (scep.timeout)")
    p.add_argument("--insecure", action="store_true", help="do not verify https certificates")
    p.add_argument("--caps", metavar="LIST",
                   help="use these capabilities instead of the server's (comma or newline "
                        "separated, e.g. 'DES3,SHA-1'): forces an algorithm choice")
    add_json_flag(p)


def _request_options(p: argparse.ArgumentParser, *, subject_required: bool) -> None:
    p.add_argument("--subject", required=subject_required,
                   help="SubjectName, e.g. 'CN=device1, O=\"Contoso, Ltd\"'")
    p.add_argument("--san", default="", help="SubjectAlternativeNames, e.g. "
                                             "'3+host.example;11+user@example.com'")
    p.add_argument("--key-usage", default="160",
                   help="KeyUsage as CERT_*_KEY_USAGE bits (default 160 = digitalSignature + "
                        "keyEncipherment)")
    p.add_argument("--eku", default="", help="EKUMapping: OIDs joined by '+'")
    p.add_argument("--template", default="", help="TemplateName")
    p.add_argument("--valid-period", default="", help="ValidPeriod: Days, Months or Years")
    p.add_argument("--valid-period-units", default="", help="ValidPeriodUnits")
    p.add_argument("--hash-algorithm", default="", help="HashAlgorithm (SHA-1, SHA-2, SHA-3)")
    ch = p.add_mutually_exclusive_group()
    ch.add_argument("--challenge", help="the challenge password (visible in ps; prefer "
                                        f"--challenge-file or ${CHALLENGE_ENV})")
    ch.add_argument("--challenge-file", metavar="FILE",
                    help="read the challenge from FILE ('-' = stdin)")
    p.add_argument("--ca-thumbprint", default="", metavar="SHA1",
                   help="CAThumbprint: refuse the server unless GetCACert returns it")
    p.add_argument("--keystore", choices=("software", "tpm"), default="software",
                   help="where the key lives (default software)")
    p.add_argument("--tcti", help="TPM TCTI (default: tpm.tcti), e.g. "
                                  "swtpm:host=127.0.0.1,port=2321")
    method = p.add_mutually_exclusive_group()
    method.add_argument("--post", dest="post", action="store_true", default=None,
                        help="PKIOperation by POST")
    method.add_argument("--get", dest="post", action="store_false",
                        help="PKIOperation by GET")
    p.add_argument("--cipher", choices=_CIPHERS, help="force the request envelope cipher")
    p.add_argument("--digest", choices=_DIGESTS, help="force the SignedData digest")
    p.add_argument("--retry-delay", type=float, default=5.0,
                   help="RetryDelay: minutes between polls while PENDING (default 5)")
    p.add_argument("--retry-count", type=int, default=3,
                   help="RetryCount: polls while PENDING (default 3, 0 = none)")
    p.add_argument("--out-cert", type=Path, metavar="FILE",
                   help="write the issued certificate (PEM; the chain follows it)")


# --- helpers --------------------------------------------------------------------------------

def _scep_config(args: argparse.Namespace, app: App) -> ScepConfig:
    import dataclasses

    cfg = app.config.scep
    changes: dict[str, Any] = {}
    if args.windows_url_form is not None:
        changes["windows_url_form"] = args.windows_url_form
    if args.timeout is not None:
        changes["timeout"] = args.timeout
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _drive(args: argparse.Namespace, cfg: ScepConfig,
           job: Callable[[BlockingHttp], Coroutine[Any, Any, T]]) -> T:
    """Run `job(http)`, the SCEP conversation of one command, without an event loop.

    A command talks to one server, one request after another: on the blocking transport the
    SCEP coroutines never suspend and `run_inline` steps them to the end, which spares the
    command importing asyncio and httpx (more than its whole conversation with the CA costs).
    The protocol code is the one the daemon runs on asyncio.
    """
    from agent.scep.client import make_blocking_http
    from agent.scep.inline import run_inline

    with make_blocking_http(cfg, verify=not args.insecure) as http:
        return run_inline(job(http))


def _caps_text(args: argparse.Namespace) -> str | None:
    if args.caps is None:
        return None
    return "\n".join(p.strip() for p in args.caps.replace(",", "\n").splitlines())


def read_challenge(args: argparse.Namespace) -> str:
    """--challenge, --challenge-file (or '-' for stdin), else $DMAGENT_SCEP_CHALLENGE."""
    from agent.errors import LocalError

    if args.challenge is not None:
        return str(args.challenge)
    if args.challenge_file:
        try:
            text = (sys.stdin.read() if args.challenge_file == "-"
                    else Path(args.challenge_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise LocalError(f"cannot read the challenge file: {exc.strerror}") from None
        return text.rstrip("\r\n")
    return os.environ.get(CHALLENGE_ENV, "")


def _key_store(args: argparse.Namespace, app: App) -> KeyStore:
    """The device's key stores (`<state>/keys/software|tpm`, as dmcertinst uses them)."""
    from agent.errors import ConfigError

    if args.keystore == "tpm":
        tcti = args.tcti or app.config.tpm.tcti
        if not tcti:
            raise ConfigError("--keystore tpm needs a TCTI",
                              advice="pass --tcti or set tpm.tcti / $DMAGENT_TPM_TCTI")
        from keystores.tpm import TpmKeyStore

        return TpmKeyStore(tcti, app.config.keys_dir / "tpm")
    return app.ctx.keystore("software")


def _csr_request(args: argparse.Namespace, challenge: str, subject: str) -> Any:
    from agent.csr import CsrRequest

    return CsrRequest(subject=subject, subject_alt_names=args.san,
                      key_usage=args.key_usage if args.key_usage.strip() else None,
                      eku=args.eku, template_name=args.template,
                      valid_period=args.valid_period,
                      valid_period_units=args.valid_period_units,
                      hash_algorithm=args.hash_algorithm, challenge=challenge)


def _options(args: argparse.Namespace, csr: Any) -> EnrollOptions:
    from agent.scep.capabilities import ContentCipher
    from agent.scep.enroll import EnrollOptions
    from keystores.base import HashAlg

    return EnrollOptions(
        server_url=args.url, csr=csr, ca_thumbprint=args.ca_thumbprint,
        retry_delay_minutes=args.retry_delay, retry_count=args.retry_count,
        caps_override=_caps_text(args),
        cipher=ContentCipher(args.cipher) if args.cipher else None,
        digest=HashAlg(args.digest) if args.digest else None, post=args.post)


def _pem(certs: list[CertificateLike]) -> str:
    from agent.scep.certificate import as_certificate

    return "".join(as_certificate(c).pem() for c in certs)


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    os.replace(tmp, path)


def _cert_info(given: CertificateLike) -> dict[str, Any]:
    from agent.scep.certificate import as_certificate

    cert = as_certificate(given)
    return {"subject": cert.subject, "issuer": cert.issuer,
            "serial": f"{cert.serial_number:x}", "thumbprint": cert.thumbprint,
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat()}


# --- getcacaps / getcacert ------------------------------------------------------------------

def run_getcacaps(args: argparse.Namespace, app: App) -> int:
    from agent.scep.capabilities import choose_algorithms, parse_caps
    from agent.scep.client import ScepClient

    cfg = _scep_config(args, app)

    async def go(http: BlockingHttp) -> tuple[Any, str]:
        async with ScepClient(args.url, cfg, http=http) as client:
            return await client.get_ca_caps(), client.respondent_url

    caps, url = _drive(args, cfg, go)
    if args.caps is not None:
        caps = parse_caps(_caps_text(args) or "")
    algs = choose_algorithms(caps)
    if args.json:
        app.print_json({"url": url, "capabilities": list(caps.keywords),
                        "unknown": list(caps.unknown), "renewal": caps.renewal,
                        "chosen": algs.as_dict()})
        return 0
    app.print(f"Server: {url}")
    for word in caps.keywords + caps.unknown:
        app.print(f"  {word}")
    app.print(f"Chosen: {algs.cipher.value}, {algs.digest.value}, "
              f"{'POST' if algs.post else 'GET'}; renewal "
              f"{'supported' if caps.renewal else 'not advertised'}")
    return 0


def run_getcacert(args: argparse.Namespace, app: App) -> int:
    from agent.scep.cacerts import check_ca_thumbprint
    from agent.scep.client import ScepClient

    cfg = _scep_config(args, app)

    async def go(http: BlockingHttp) -> tuple[Any, str]:
        async with ScepClient(args.url, cfg, http=http) as client:
            await client.get_ca_caps()
            return await client.get_ca_cert(), client.respondent_url

    ca, url = _drive(args, cfg, go)
    if args.thumbprint:
        check_ca_thumbprint(ca, args.thumbprint, url)
    if args.out:
        _write(args.out, _pem(list(ca.certificates)))
    roles = []
    for cert in ca.certificates:
        role = [r for r, c in (("ca", ca.ca), ("encryption", ca.encryption)) if c is cert]
        if cert in ca.signers:
            role.append("signing")
        roles.append({**_cert_info(cert), "roles": role})
    if args.json:
        app.print_json({"url": url, "ra": ca.has_ra, "certificates": roles})
        return 0
    app.print(f"Server: {url} ({'CA with RA' if ca.has_ra else 'CA only'})")
    for i, info in enumerate(roles):
        app.print(f"[{i}] {info['subject']}")
        app.print(f"    issuer     {info['issuer']}")
        app.print(f"    thumbprint {info['thumbprint']}  serial {info['serial']}")
        app.print(f"    roles      {', '.join(info['roles']) or '-'}")
    if args.out:
        app.print(f"Written: {args.out}")
    return 0


# --- enroll / renew -------------------------------------------------------------------------

def run_enroll(args: argparse.Namespace, app: App) -> int:
    # The key is made first, in a worker thread, while this thread reads the config, opens
    # the key store, imports the SCEP and HTTP stack and asks GetCACaps/GetCACert (which need
    # no key): RSA generation releases the GIL (a TPM create waits on the TPM), so start-up,
    # key generation and the first round trips overlap instead of adding up. A software key
    # is usually under way already: the CLI starts it before parsing (keymaker.start_early).
    from agent.commands.keymaker import KeyMaker, take_early

    software = args.keystore == "software"
    maker = (take_early(args.key_length) if software else None) or \
        KeyMaker(args.key_length if software else None)  # not started by the CLI already
    store: KeyStore | None = None
    try:
        from agent.csr import validate_request
        from agent.errors import LocalError
        from keystores.base import KeyAlgorithm, KeySpec

        if args.out_key and args.keystore != "software":
            raise LocalError("--out-key works with the software key store only: a TPM key "
                             "never leaves the TPM")
        key_password = _key_password(args) if args.out_key else None
        challenge = read_challenge(args)
        csr = _csr_request(args, challenge, args.subject)
        validate_request(csr)  # a bad profile value must not cost a stored key
        spec = KeySpec(KeyAlgorithm.RSA, args.key_length, exportable=bool(args.out_key),
                       label="dmagent scep enroll")
        store = _key_store(args, app)
        store.check(spec)
        maker.store_in(store, spec)
        options = _options(args, csr)
        cfg = _scep_config(args, app)

        async def run(http: BlockingHttp) -> EnrollResult:
            from agent.scep.inline import Waiting

            return await _enroll(http, cfg, options, Waiting(maker.job))

        result = _drive(args, cfg, run)
    except BaseException:
        maker.abandon()
        # a key for a request that failed is of no use (wait for it if still being made)
        if store is not None and maker.job.exception() is None:
            store.delete(maker.job.result().key_id)
        raise
    key = maker.job.result()
    if args.out_key and key_password is not None:
        export = getattr(key, "export_pkcs8", None)
        if export is None:
            raise LocalError(f"the {store.kind} key store cannot export keys")
        _write(args.out_key, export(key_password), 0o600)
    return _report(args, app, result, key, store.kind, maker.seconds)


def run_renew(args: argparse.Namespace, app: App) -> int:
    from cryptography import x509

    from agent.errors import LocalError
    from keystores.base import KeySpec

    try:
        raw = args.cert.read_bytes()
    except OSError as exc:
        raise LocalError(f"cannot read {args.cert}: {exc.strerror}") from None
    try:
        old_cert = (x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw
                    else x509.load_der_x509_certificate(raw))
    except ValueError as exc:
        raise LocalError(f"{args.cert} is not a certificate: {exc}") from None
    challenge = read_challenge(args)
    from agent.csr import name_to_str, validate_request

    subject = args.subject if args.subject is not None else name_to_str(
        old_cert.subject.public_bytes())
    csr = _csr_request(args, challenge, subject)
    validate_request(csr)
    options = _options(args, csr)
    store = _key_store(args, app)
    cfg = _scep_config(args, app)

    async def go(http: BlockingHttp) -> tuple[EnrollResult, KeyHandle, float]:
        old_key = store.load(args.key_id)
        started = time.perf_counter()
        if args.reuse_key:
            new_key = old_key
        else:
            spec = KeySpec(old_key.spec.algorithm, old_key.spec.size, label="dmagent scep renew")
            new_key = store.create(spec)
        keygen = time.perf_counter() - started
        try:
            result = await _enroll(http, cfg, options, new_key, renew_with=(old_key, old_cert))
        except BaseException:
            if new_key is not old_key:
                store.delete(new_key.key_id)
            raise
        return result, new_key, keygen

    result, key, keygen = _drive(args, cfg, go)
    return _report(args, app, result, key, store.kind, keygen)


async def _enroll(http: BlockingHttp, cfg: ScepConfig, options: EnrollOptions,
                  key: KeyHandle | Awaitable[KeyHandle], **kwargs: Any) -> EnrollResult:
    """`enroll` without an event loop: PENDING polls sleep in this thread, key operations
    (TPM included) run inline, as there is nothing else to keep running meanwhile."""
    from agent.scep.enroll import enroll
    from agent.scep.inline import blocking_sleep

    return await enroll(options, key, config=cfg, http=http, sleep=blocking_sleep,
                        offload=False, **kwargs)


def _key_password(args: argparse.Namespace) -> bytes:
    from agent.errors import LocalError

    if args.out_key_password_file:
        try:
            return bytes(Path(args.out_key_password_file).read_bytes()).rstrip(b"\r\n")
        except OSError as exc:
            raise LocalError(f"cannot read the key password file: {exc.strerror}") from None
    env = os.environ.get("DMAGENT_KEY_PASSWORD", "")
    if not env:
        raise LocalError("--out-key needs a password to encrypt the key with",
                         advice="give --out-key-password-file FILE or $DMAGENT_KEY_PASSWORD")
    return env.encode()


def _report(args: argparse.Namespace, app: App, result: EnrollResult, key: KeyHandle,
            store_kind: str, keygen: float) -> int:
    cert = result.certificate
    if args.out_cert:
        _write(args.out_cert, _pem([cert, *result.chain]))
    info = _cert_info(cert)
    timings = {"keygen": round(keygen * 1000, 2), **result.timings_ms()}
    if args.json:
        from agent.scep.cacerts import thumbprint

        app.print_json({
            **info, "certificate": _pem([cert]), "chain": _pem(list(result.chain)),
            "key_id": key.key_id, "keystore": store_kind,
            "respondent_url": result.respondent_url, "transaction_id": result.transaction_id,
            "message_type": result.message_type.name, "algorithms": result.algorithms.as_dict(),
            "reply_digest": result.reply_digest.value, "polls": result.polls,
            "ca_thumbprints": [thumbprint(c) for c in result.ca.certificates],
            "timings_ms": timings})
        return 0
    app.print(f"Certificate issued: {info['subject']}")
    app.print(f"  issuer      {info['issuer']}")
    app.print(f"  serial      {info['serial']}")
    app.print(f"  thumbprint  {info['thumbprint']}")
    app.print(f"  valid       {info['not_before']} .. {info['not_after']}")
    app.print(f"  key         {key.key_id} ({store_kind})")
    app.print(f"  server      {result.respondent_url}")
    algs = result.algorithms
    app.print(f"  request     {result.message_type.name} {algs.cipher.value} "
              f"{algs.digest.value} {'POST' if algs.post else 'GET'}, transaction "
              f"{result.transaction_id}, {result.polls} poll(s)")
    if args.out_cert:
        app.print(f"Written: {args.out_cert}")
    if args.out_key:
        app.print(f"Written: {args.out_key}")
    return 0
