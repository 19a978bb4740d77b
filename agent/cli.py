"""The `dmagent` command: parse arguments, run one subcommand, turn errors into one clear line.

Each subcommand lives in `agent/commands/<name>.py` with `register(subparsers)`; those modules
import their heavy dependencies inside the handler so `dmagent --help` and quick commands start
fast. This module is the one place where exceptions become user-facing output and exit codes.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from agent import __version__

# Subcommands in help order, with the one-line help shown when the module is not built yet.
COMMANDS: dict[str, str] = {
    "sync": "run an OMA-DM session with the MDM server now",
    "run": "run the agent as a daemon (sync schedule + enrollment tasks)",
    "certinst": "run one enrollment attempt for a SCEP node (like dmcertinst.exe)",
    "scep": "standalone SCEP client: getcacaps, getcacert, enroll, renew",
    "status": "accounts, last sync, SCEP nodes with Status/ErrorCode/thumbprint",
    "tasks": "list, show and run the enrollment tasks",
    "certs": "list, show and export installed certificates",
    "tree": "read the local DM tree",
    "reg": "query, export and edit the agent's registry store (like reg.exe)",
    "events": "show diagnostic events",
    "error": "decode an HRESULT (like certutil -error)",
    "fleet": "run many emulated devices in one process",
    "lab": "reference MDM server, SCEP CA and the end-to-end demo",
    "version": "show versions",
}

EXIT_CODES = """\
exit codes:
  0   success
  1   the operation failed (the peer refused or answered wrongly; see the message)
  2   usage error (bad arguments)
  3   configuration error
  4   a server could not be reached
  5   not found (registry key or value, node, task, certificate)
  6   the state directory is locked by another process (e.g. the daemon)
  70  internal error (a bug: run with -v and report the trace)
  130 interrupted
"""

# Commands implemented outside agent/commands (the CLI is the composition root).
COMMAND_MODULES: dict[str, str] = {"run": "service.commands", "fleet": "service.fleet"}

LONG_RUNNING = frozenset({"run", "fleet"})

# gen0 threshold while a one-shot command runs (the default is 700 allocations).
ONE_SHOT_GC_THRESHOLD = 100_000

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `dmagent` parser. With `argv`, only the subcommand it names is built.

    Building a subcommand imports its module, and every parser costs gettext look-ups:
    building all fourteen costs tens of milliseconds at every start. So when `argv` names a
    command (and asks for no top-level help, which lists them all) only that one is built,
    and the top-level parser raises ArgumentError instead of exiting on its own errors:
    `main` then parses again with the full parser, which reports them as always.
    """
    chosen = chosen_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="dmagent",
        description="A device-side MDM agent that behaves like the Windows MDM client: "
                    "OMA-DM (SyncML, MS-MDM) sessions, ClientCertificateInstall SCEP "
                    "enrollment with TPM or software keys, Windows-style diagnostics.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
        exit_on_error=chosen is None)
    parser.add_argument("--version", action="version", version=f"dmagent {__version__}")
    parser.add_argument("-c", "--config", type=_path, metavar="FILE",
                        help="TOML config file (default: $DMAGENT_CONFIG, then the "
                             "site config dir's dmagent/config.toml)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the store, keys, certificates and logs live "
                             "(overrides state_dir; fleets and tests use it)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug) and full traces on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        if chosen is not None and name != chosen:
            continue
        module_name = COMMAND_MODULES.get(name, f"agent.commands.{name}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            _register_unavailable(sub, name, summary)
        else:
            module.register(sub)
    return parser


# Top-level options that take a value (so the token after them is not the command).
_VALUE_OPTIONS = ("--config", "--state-dir")


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names, or None when unsure or when top-level help or the
    version is asked for (then every subcommand is built, as `--help` lists them all)."""
    args = iter(argv)
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            if option in ("--help", "--version") or (len(option) > 2 and (
                    "--help".startswith(option) or "--version".startswith(option))):
                return None
            if "=" not in arg and any(o.startswith(option) for o in _VALUE_OPTIONS):
                next(args, None)  # argparse accepts unambiguous prefixes of long options
            continue
        if arg.startswith("-") and len(arg) > 1:
            flags = arg[1:]
            for i, flag in enumerate(flags):
                if flag == "h":
                    return None
                if flag == "c":
                    if i == len(flags) - 1:
                        next(args, None)  # -c FILE
                    break  # -cFILE
            continue
        return arg if arg in COMMANDS else None
    return None


def _path(text: str) -> Any:
    from pathlib import Path

    return Path(text)


def _register_unavailable(sub: Any, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=f"{summary} (not available in this build)",
                       description=f"{summary}. Not available in this build yet.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def unavailable(args: argparse.Namespace, app: Any) -> int:
        from agent.errors import LocalError

        raise LocalError(f"`dmagent {name}` is not available in this build yet",
                         advice="see `dmagent --help` for the commands that are")

    p.set_defaults(func=unavailable)


def main(argv: Sequence[str] | None = None) -> int:
    from agent import dataclass_cache

    # Before any module defining dataclasses is imported: their generated methods come
    # compiled from the cache beside the .pyc (~15 ms of a `dmagent scep enroll` start).
    dataclass_cache.enable()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    chosen = chosen_command(argv_list)  # (reg.exe's /switches, translated below, keep it)
    if chosen == "scep":
        # `scep enroll` with a software key: its key generation (the longest step) starts
        # now, before the parser is even built; the command takes it once parsed.
        from agent.commands.keymaker import release_early, start_early

        start_early(argv_list)
    from agent.commands.reg import translate_switches

    argv_list = translate_switches(argv_list)
    one_shot = chosen not in LONG_RUNNING
    thresholds = gc.get_threshold()
    if one_shot:
        # A one-shot command spends most of its life importing: tens of thousands of objects
        # that all live to the end, which the collector would walk ~50 times for nothing
        # (8 ms of a 165 ms `scep enroll`). Collect rarely; the daemon keeps the defaults.
        gc.set_threshold(ONE_SHOT_GC_THRESHOLD, *thresholds[1:])
    try:
        return _run(argv_list, thresholds)
    finally:
        gc.set_threshold(*thresholds)
        if chosen == "scep":
            release_early()  # a key the command did not take is not stored


def _run(argv_list: list[str], gc_thresholds: tuple[int, int, int]) -> int:
    from agent.commands.base import App
    from agent.errors import DmAgentError
    from agent.logsetup import needs_setup, setup_logging

    try:
        args = build_parser(argv_list).parse_args(argv_list)
    except argparse.ArgumentError:  # not what the command guessed from argv expected
        args = None
    if args is None or not hasattr(args, "func"):
        args = build_parser().parse_args(argv_list)
    if needs_setup(args.verbose, logs_warnings=getattr(args, "logs_warnings", True)):
        setup_logging(verbose=args.verbose)
    if args.command in LONG_RUNNING:
        gc.set_threshold(*gc_thresholds)  # in case argv named it in a way not foreseen above
    else:
        # When the process ends, Python's final garbage collections walk every object the
        # imports left (cryptography, dataclasses, typing: ~25 ms of a 200 ms `scep enroll`).
        # A one-shot command has closed what it opened by then, so exempt them (gc.freeze).
        import atexit

        atexit.register(gc.freeze)
    app = App(args)
    try:
        return int(args.func(args, app))
    except DmAgentError as exc:
        _report(exc.message, exc.advice, args.verbose, exc.diagnostics())
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0  # `dmagent events | head`: the reader left, nothing to report
    except Exception as exc:
        from keystores.base import KeyStoreError

        if isinstance(exc, KeyStoreError):  # the bottom layer has its own error type
            _report(exc.message, exc.advice, args.verbose, "")
            return 1
        from agent.logsetup import debug

        debug("dmagent.cli", "internal error: %r", exc)
        _report(f"internal error: {type(exc).__name__}: {exc}",
                "this is a bug; run again with -v and report the trace", args.verbose, "")
        return EXIT_INTERNAL
    finally:
        app.close()


def _report(message: str, advice: str, verbose: int, details: str) -> None:
    print(f"dmagent: error: {message}", file=sys.stderr)
    if advice:
        print(f"dmagent: hint: {advice}", file=sys.stderr)
    if verbose:
        if details:
            print(details, file=sys.stderr)
        import traceback

        traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
