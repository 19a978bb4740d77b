"""Logging for the CLI and the service: stderr for people, syslog-prefixed lines for journald."""

from __future__ import annotations

import logging
import os
import sys

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                    logging.ERROR: 3, logging.CRITICAL: 2}


class _JournaldFormatter(logging.Formatter):
    """journald reads `<N>` at the start of a line as the syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {super().format(record)}"


def setup_logging(level: str = "warning", *, verbose: int = 0) -> None:
    """Configure the `dmagent` logger. `-v` shows info, `-vv` debug; else `level` applies."""
    logger = logging.getLogger("dmagent")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    if verbose:
        lvl = logging.DEBUG if verbose > 1 else logging.INFO
    else:
        lvl = getattr(logging, level.upper(), logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(_JournaldFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(lvl)
    logger.propagate = False
