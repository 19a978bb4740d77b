"""The daemon's control socket: how `dmagent sync` and `dmagent tasks run` reach a running
daemon. One JSON object per line each way over a UNIX stream socket in the state dir."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from agent.diagnostics import HResult
from agent.errors import UnreachableError

SOCKET_NAME = "dmagent.sock"
_MAX_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def socket_address(state_dir: Path) -> str:
    """The socket path, or (Linux) an abstract name derived from it when the path is too long
    for sun_path — e.g. deep test directories."""
    path = str((state_dir / SOCKET_NAME).absolute())
    if len(path.encode()) <= _MAX_PATH or not sys.platform.startswith("linux"):
        return path
    return "\0dmagent-" + hashlib.sha256(path.encode()).hexdigest()[:32]


async def request(state_dir: Path, command: dict[str, Any], timeout: float = 600.0
                  ) -> dict[str, Any]:
    """Send one command to the daemon of `state_dir` and return its answer."""
    address = socket_address(state_dir)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(address), 5)
    except (OSError, TimeoutError):
        raise UnreachableError(
            f"no dmagent daemon is running for {state_dir}", hresult=HResult.ERROR_NOT_FOUND,
            advice="start one with `dmagent run`, or use `dmagent sync --once`") from None
    try:
        writer.write(json.dumps(command).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line:
        raise UnreachableError("the daemon closed the control connection without answering")
    answer: dict[str, Any] = json.loads(line)
    return answer
