"""The daemon: one process, one event loop, one scheduler, one or many devices.

`dmagent run` starts it for the configured device; `dmagent fleet` (later) for many. It holds
each device's state-dir lock, answers the control socket (`sync`, `run-task`, `status`),
turns SIGTERM/SIGINT into a clean stop and SIGHUP into an immediate sync, and speaks sd_notify
(READY, STATUS, WATCHDOG, STOPPING) under systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
from dataclasses import asdict
from typing import Any

from agent.control import socket_address
from agent.device import DeviceContext
from agent.errors import DmAgentError
from agent.statelock import StateLock
from service.runtime import DeviceRuntime
from service.systemd import notify, watchdog_interval

log = logging.getLogger("dmagent.service")


class Daemon:
    def __init__(self, contexts: list[DeviceContext]) -> None:
        if not contexts:
            raise ValueError("a daemon needs at least one device")
        self.contexts = contexts
        self.runtimes: list[DeviceRuntime] = []
        self._stop = asyncio.Event()
        self._locks: list[StateLock] = []
        self._servers: list[asyncio.base_events.Server] = []

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        for ctx in self.contexts:
            lock = StateLock(ctx.config.state_dir / "dmagent.lock")
            lock.acquire()
            self._locks.append(lock)
        loop = asyncio.get_running_loop()
        scheduler = AsyncIOScheduler(event_loop=loop, timezone="UTC",
                                     job_defaults={"max_instances": 1})
        scheduler.start()
        try:
            for ctx in self.contexts:
                runtime = DeviceRuntime(ctx, scheduler)
                self.runtimes.append(runtime)
                self._servers.append(await asyncio.start_unix_server(
                    functools.partial(self._control, runtime),
                    path=socket_address(ctx.config.state_dir)))
                runtime.start()
            self._install_signals(loop)
            notify("READY=1\nSTATUS=running")
            log.info("dmagent daemon running (pid %d, %d device(s))", os.getpid(),
                     len(self.runtimes))
            watchdog = asyncio.create_task(self._watchdog())
            await self._stop.wait()
            watchdog.cancel()
        finally:
            notify("STOPPING=1")
            log.info("dmagent daemon stopping")
            scheduler.shutdown(wait=False)
            for server in self._servers:
                server.close()
            for ctx in self.contexts:
                path = socket_address(ctx.config.state_dir)
                if not path.startswith("\0"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            for lock in self._locks:
                lock.release()
        return 0

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sync_all)

    def _sync_all(self) -> None:
        for runtime in self.runtimes:
            runtime.request_sync("SIGHUP")

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _control(self, runtime: DeviceRuntime, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                command = json.loads(line)
                answer = await self._answer(runtime, command)
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"ok": False, "error": f"bad control request: {exc}"}
            except DmAgentError as exc:
                answer = {"ok": False, "error": exc.message}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, runtime: DeviceRuntime, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "sync":
            results = await runtime.sync()
            return {"ok": all(r.ok for r in results), "results": [asdict(r) for r in results]}
        if cmd == "status":
            return {"ok": True, "pid": os.getpid(), "device": runtime.name,
                    "syncs": runtime.syncs_done,
                    "jobs": [{"id": j.id, "next_run": j.next_run_time.isoformat()
                              if j.next_run_time else None}
                             for j in runtime.scheduler.get_jobs()
                             if j.id.startswith(runtime.name + ":")]}
        if cmd == "run-task":
            outcome = await runtime.run_task_now(command["enrollment_id"], command["name"])
            if outcome is None:
                return {"ok": False, "error": "the task is gone (finished or deleted)"}
            return {"ok": outcome.ok, **outcome.as_dict()}
        raise KeyError(cmd)
