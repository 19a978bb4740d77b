"""Logging for the CLI and the service: stderr for people, syslog-prefixed lines for journald.

`logging` is imported by `setup_logging`, not with this module: with traceback, linecache,
tokenize and string it costs ~5 ms of a start, and a one-shot command at the default level
that logs nothing need not pay it (`needs_setup`). Code on such a path writes its debug
lines through `debug()`, which imports nothing.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

# syslog priorities by logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL)
_SYSLOG_PRIORITY = {10: 7, 20: 6, 30: 4, 40: 3, 50: 2}


def under_journald() -> bool:
    """stderr goes to the journal (a systemd service, or a unit's command)."""
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def needs_setup(verbose: int, *, logs_warnings: bool = True) -> bool:
    """Whether a command must configure logging before it runs.

    A command that says it logs nothing above debug (`logs_warnings=False`: `dmagent scep`)
    skips it at the default level, unless `logging` is loaded already or stderr is the
    journal (whose lines carry a priority prefix).
    """
    return bool(verbose) or logs_warnings or under_journald() or "logging" in sys.modules


def setup_logging(level: str = "warning", *, verbose: int = 0) -> None:
    """Configure the `dmagent` logger. `-v` shows info, `-vv` debug; else `level` applies."""
    import logging

    logger = logging.getLogger("dmagent")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    if verbose:
        lvl = logging.DEBUG if verbose > 1 else logging.INFO
    else:
        lvl = getattr(logging, level.upper(), logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(_journald_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(lvl)
    logger.propagate = False


def _journald_formatter() -> logging.Formatter:
    import logging

    class JournaldFormatter(logging.Formatter):
        """journald reads `<N>` at the start of a line as the syslog priority."""

        def format(self, record: logging.LogRecord) -> str:
            prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
            return f"<{prio}>{record.name}: {super().format(record)}"

    return JournaldFormatter("%(message)s")


def debug(name: str, msg: str, *args: object) -> None:
    """`logging.getLogger(name).debug(msg, *args)`, without importing `logging`.

    When `logging` is not loaded, nothing configured a handler, so no debug line could be
    shown (Python's last-resort handler shows warnings and worse only): there is nothing to do.
    """
    loaded = sys.modules.get("logging")
    if loaded is not None:
        loaded.getLogger(name).debug(msg, *args)
