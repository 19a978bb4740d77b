"""`dmagent fleet`: many emulated devices in one process — one event loop, one scheduler, one
DeviceContext (own state dir, identity, registry store, key store) per device.

The same daemon code as `dmagent run`, fed N device contexts; each device syncs, enrolls and
reports on its own schedule. `--until-done` exits once every device's SCEP nodes are installed
and no task is pending (for load tests and CI), printing a summary (`--json` for scripts).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.commands.base import App, add_json_flag

if TYPE_CHECKING:  # imported lazily: every `dmagent` start builds this command's parser
    from agent.config import Config
    from agent.device import DeviceContext


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fleet", help="run many emulated devices in one process",
        description="Run N emulated devices in this process against one MDM server. Each "
                    "device gets its own state dir under --root (registry store, keys, "
                    "certificates, events), a stable DeviceID derived from its name, and the "
                    "rest of the configuration from --config/environment. Software keys unless "
                    "[tpm] tcti is set (one TPM shared by all devices: fine for a few, not for "
                    "thousands).")
    p.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices")
    p.add_argument("--root", required=True, metavar="DIR",
                   help="parent of the devices' state dirs (DIR/<name>)")
    p.add_argument("--prefix", default="fleet", help="device names: PREFIX-00001, ...")
    p.add_argument("--server", metavar="URL", help="the MDM server (default: server.url)")
    p.add_argument("--until-done", action="store_true",
                   help="exit when every device has its certificates and no pending task")
    p.add_argument("--timeout", type=float, default=0.0, metavar="S",
                   help="with --until-done: give up after S seconds (exit 1)")
    add_json_flag(p)
    p.set_defaults(func=run)


def device_config(base: Config, root: Path, prefix: str, index: int,
                  server: str | None) -> Config:
    import dataclasses
    import uuid

    name = f"{prefix}-{index:05d}"
    device = dataclasses.replace(
        base.device, name=name,
        device_id=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.dmagent.fleet")).upper(),
        user_sid="", user_upn=base.device.user_upn or f"{name}@fleet.test")
    server_cfg = base.server if not server else dataclasses.replace(base.server, url=server)
    return dataclasses.replace(base, state_dir=root / name, device=device, server=server_cfg)


def raise_fd_limit() -> None:
    """Each device holds a few descriptors (store + WAL + socket): lift the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def device_done(ctx: DeviceContext) -> bool:
    from agent.taskstore import TaskStore

    reg = ctx.registry
    if TaskStore(reg).list():
        return False
    nodes = 0
    for root in (r"HKLM\Software\Microsoft\SCEP", r"HKCU\Software\Microsoft\SCEP"):
        if not reg.key_exists(root):
            continue
        for provider in reg.subkeys(root):
            for uid in reg.subkeys(f"{root}\\{provider}"):
                nodes += 1
                if reg.query(f"{root}\\{provider}\\{uid}", "Status") != 1:
                    return False
    return nodes > 0


def run(args: argparse.Namespace, app: App) -> int:
    import asyncio

    from agent.device import DeviceContext
    from agent.errors import LocalError
    from agent.logsetup import setup_logging

    if args.devices < 1:
        raise LocalError("--devices must be at least 1")
    if not args.verbose:
        setup_logging("warning")
    raise_fd_limit()
    root = Path(args.root).absolute()
    contexts = [DeviceContext(device_config(app.config, root, args.prefix, i, args.server))
                for i in range(1, args.devices + 1)]
    if not any(c.config.server.url for c in contexts):
        raise LocalError("no MDM server: give --server URL or set server.url")
    try:
        summary = asyncio.run(_run_fleet(contexts, args))
    finally:
        for ctx in contexts:
            ctx.close()
    if args.json:
        app.print_json(summary)
    else:
        app.print(f"fleet: {summary['done']}/{summary['devices']} devices enrolled in "
                  f"{summary['seconds']} s ({summary['syncs']} syncs, "
                  f"{summary['enrollments']} enrollments, {summary['failed_attempts']} failed "
                  f"attempts)")
    return 0 if summary["done"] == summary["devices"] or not args.until_done else 1


async def _run_fleet(contexts: list[DeviceContext], args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from rich.progress import Progress

    from service.daemon import Daemon

    daemon = Daemon(contexts)
    started = time.monotonic()
    task = asyncio.create_task(daemon.run())
    done: set[int] = set()
    with Progress(transient=True) as progress:
        bar = progress.add_task("devices enrolled", total=len(contexts))
        while not task.done():
            await asyncio.sleep(0.5)
            for i, ctx in enumerate(contexts):
                if i not in done and device_done(ctx):
                    done.add(i)
            progress.update(bar, completed=len(done))
            elapsed = time.monotonic() - started
            if args.until_done and (len(done) == len(contexts) or
                                    (args.timeout and elapsed > args.timeout)):
                daemon.stop()
    await task
    outcomes = [o for rt in daemon.runtimes for o in rt.outcomes]
    return {"devices": len(contexts), "done": len(done),
            "seconds": round(time.monotonic() - started, 1),
            "syncs": sum(rt.syncs_done for rt in daemon.runtimes),
            "enrollments": sum(1 for o in outcomes if o.ok),
            "failed_attempts": sum(1 for o in outcomes if not o.ok),
            "root": str(Path(args.root).absolute())}
