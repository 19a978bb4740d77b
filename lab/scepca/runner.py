"""Running the CA: build the app from a directory and a config, serve it with uvicorn.

`ThreadedServer` runs uvicorn on its own event loop in a background thread, on a socket bound
before the thread starts (port 0 = a free port, no race), which is what tests and the lab
MDM server embed. `serve_forever` is the CLI's foreground server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lab.scepca.ca import CertificateAuthority
from lab.scepca.config import CAConfig
from lab.scepca.db import CADatabase
from lab.scepca.faults import FaultSet
from lab.scepca.server import ScepCAApp
from lab.scepca.service import ScepService

log = logging.getLogger("lab.scepca")

TOKEN_FILE = "control.token"  # noqa: S105 - a file name
SERVER_FILE = "server.json"


def open_ca(directory: Path, *, create: bool = True) -> CertificateAuthority:
    if create and not CertificateAuthority.exists(directory):
        return CertificateAuthority.init(directory, now=datetime.now(UTC))
    return CertificateAuthority.load(directory)


def build_app(directory: Path, config: CAConfig, *, faults: FaultSet | None = None,
              token: str | None = None, create: bool = True) -> ScepCAApp:
    ca = open_ca(directory, create=create)
    db = CADatabase(ca.db_path)
    service = ScepService(ca, db, config)
    return ScepCAApp(service, faults or FaultSet(), token=token or secrets.token_urlsafe(24))


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)  # 50+ parallel enrolments must not overflow the backlog
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: ScepCAApp, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=2, timeout_keep_alive=5,
                            limit_concurrency=None, backlog=512)
    return uvicorn.Server(config)


def write_server_info(directory: Path, url: str, port: int, token: str, mode: str) -> None:
    """`server.json` (address) and `control.token` (0600) for `python -m lab.scepca faults`."""
    fd = os.open(directory / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    (directory / SERVER_FILE).write_text(json.dumps(
        {"url": url, "port": port, "pid": os.getpid(), "mode": mode}, indent=1) + "\n")


@dataclass
class ThreadedServer:
    app: ScepCAApp
    host: str = "127.0.0.1"
    port: int = 0
    log_level: str = "warning"

    def __post_init__(self) -> None:
        self._sock = bind(self.host, self.port)
        self.port = int(self._sock.getsockname()[1])
        self._server = _uvicorn_server(self.app, self.log_level)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def main() -> None:
                task = asyncio.ensure_future(self._server.serve(sockets=[self._sock]))
                while not self._server.started and not task.done():
                    await asyncio.sleep(0.01)
                started.set()
                await task

            try:
                loop.run_until_complete(main())
            except BaseException as exc:  # surfaced by start()/stop()
                self._error = exc
                started.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"lab-scepca:{self.port}",
                                        daemon=True)
        self._thread.start()
        if not started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the lab SCEP CA did not start: {self._error!r}")

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just closed
                loop.call_soon_threadsafe(self.app.close)
        self._server.should_exit = True
        self._thread.join(timeout)
        self._thread = None
        self._sock.close()

    def call(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the server's loop (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)


def serve_forever(app: ScepCAApp, directory: Path, host: str, port: int,
                  log_level: str = "info") -> None:
    sock = bind(host, port)
    port = int(sock.getsockname()[1])
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}{app.service.config.path}"
    write_server_info(directory, url, port, app.token, app.service.config.mode.value)
    print(f"lab SCEP CA ({app.service.config.mode.value} mode) at {url}", flush=True)
    print(f"CA thumbprint {app.service.ca.thumbprint}", flush=True)
    server = _uvicorn_server(app, log_level)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        (directory / SERVER_FILE).unlink(missing_ok=True)
