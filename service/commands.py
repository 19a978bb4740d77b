"""`dmagent run`: the daemon (the composition root for the long-running side)."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.base import App


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run the agent as a daemon (sync schedule + enrollment tasks)",
        description="Run as a daemon: sync with the MDM server on the DMClient poll schedule "
                    "(and at start), run the enrollment tasks (3 attempts, 1 minute apart), "
                    "report results at the next sync. SIGHUP or `dmagent sync` syncs now; "
                    "SIGTERM stops cleanly. Under systemd it uses sd_notify and the watchdog; "
                    "logs go to stderr (the journal). Exit 6 when another daemon holds the "
                    "state dir.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, app: App) -> int:
    import signal

    # A SIGTERM that lands while we start (before the event loop owns the signals) is a
    # clean stop too, not a death by signal.
    def early_stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, early_stop)
    import asyncio

    from agent.logsetup import setup_logging
    from service.daemon import Daemon

    if not args.verbose:  # a service logs at the configured level, not the CLI's warning
        setup_logging(app.config.log_level)
    return asyncio.run(Daemon([app.ctx]).run())
