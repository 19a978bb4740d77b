"""Serve a lab over HTTPS on loopback with uvicorn (the `lab` extra), foreground or in a thread.

The socket is bound before uvicorn starts (port 0 picks a free port without a race), the TLS
certificate is the lab's (127.0.0.1 and localhost), and `server.json` in the lab directory says
where it listens so the CLI can find the control API.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from lab.labdir import LabDir
from lab.mdm.app import LabApp


@dataclass
class Running:
    lab: LabDir
    app: LabApp
    server: Any  # uvicorn.Server
    sock: socket.socket
    thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def mdm_url(self) -> str:
        return self.base_url + self.app.lab.config().server_path

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.app.close()
        self.sock.close()
        _remove_info(self.lab)


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the lab serves on loopback only, not {host!r}")
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says TCP; with proto 0, Nagle + delayed ACK cost 40 ms per response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def prepare(lab: LabDir, *, port: int = 0, log_level: str = "warning",
            clock: Any = None) -> Running:
    import uvicorn

    sock = bind(port=port)
    app = LabApp(lab) if clock is None else LabApp(lab, clock=clock)
    config = uvicorn.Config(app, ssl_certfile=str(lab.server_cert_path),
                            ssl_keyfile=str(lab.server_key_path), log_level=log_level,
                            lifespan="on", access_log=False, timeout_graceful_shutdown=2)
    return Running(lab, app, uvicorn.Server(config), sock)


def write_info(run: Running) -> None:
    info = {"url": run.base_url, "mdm_url": run.mdm_url, "port": run.port, "pid": os.getpid()}
    run.lab.server_info_path.write_text(json.dumps(info, indent=2) + "\n")


def _remove_info(lab: LabDir) -> None:
    info = lab.server_info()
    if info and info.get("pid") == os.getpid():
        lab.server_info_path.unlink(missing_ok=True)


def start_in_thread(lab: LabDir, *, port: int = 0, timeout: float = 10.0,
                    clock: Any = None) -> Running:
    run = prepare(lab, port=port, clock=clock)
    run.thread = threading.Thread(target=run.server.run, kwargs={"sockets": [run.sock]},
                                  name=f"lab-server-{run.port}", daemon=True)
    run.thread.start()
    deadline = time.monotonic() + timeout
    while not run.server.started:
        if not run.thread.is_alive() or time.monotonic() > deadline:
            run.stop()
            raise RuntimeError("the lab server did not start")
        time.sleep(0.01)
    write_info(run)
    return run


def serve_forever(lab: LabDir, *, port: int = 0, log_level: str = "info",
                  on_ready: Any = None) -> None:
    """Foreground (`dmagent lab serve`): returns on SIGTERM, KeyboardInterrupt on SIGINT.

    uvicorn re-raises the signal it caught once it has shut down; a SIGTERM handler turning it
    into SystemExit lets the `finally` below remove server.json.
    """
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run = prepare(lab, port=port, log_level=log_level)
    write_info(run)
    if on_ready is not None:
        on_ready(run)
    try:
        run.server.run(sockets=[run.sock])
    finally:
        run.app.close()
        run.sock.close()
        _remove_info(lab)
