"""`make demo` / `dmagent lab demo`: the whole enrollment chain on this machine, end to end.

    swtpm  ←  dmagent run (the device)  →  lab MDM (HTTPS, Intune-style profiles + challenges)
                         ↓ SCEP
            micromdm scepserver  →  lab validator (-csrverifierexec: the connector's checks)

Nothing is simulated: the agent is the real daemon in its own process, the keys are made in
swtpm (device certificate, KeyProtection 2) and in the software KSP (user certificate), the CA
is micromdm's, and the lab learns the result through the next OMA-DM session. Everything the
demo starts is stopped at the end; its files stay in the demo directory for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from agent.commands.base import App
from agent.errors import LocalError

DEVICE_ID = "5D3C0E2A-7B1F-4C8D-9E6A-0F1B2C3D4E5F"
DEVICE_NAME = "demo-laptop"
UPN = "alice@lab.test"
PROFILES = ("device-client-auth", "user-email")


def run(args: argparse.Namespace, app: App) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    base = Path(args.dir).absolute()
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    started = time.monotonic()
    with ExitStack() as stack:
        status = stack.enter_context(console.status("starting swtpm"))
        tpm = stack.enter_context(swtpm(base / "tpm"))
        status.update("starting the lab MDM (HTTPS)")
        from lab.testing import LabServer, micromdm_with_validator

        lab = stack.enter_context(LabServer(base / "lab"))
        status.update("starting micromdm scepserver with the lab's challenge validator")
        ca = micromdm_with_validator(lab.lab.path, base / "micromdm")
        stack.callback(ca.stop)
        assert lab.client is not None
        lab.client.set_device(DEVICE_ID, upn=UPN, name=DEVICE_NAME)
        for profile in PROFILES:
            lab.client.assign(profile, device=DEVICE_ID)
        env = {**os.environ, "DMAGENT_STATE_DIR": str(base / "agent"),
               "DMAGENT_SERVER_URL": lab.url, "DMAGENT_SERVER_CA_BUNDLE": lab.ca_bundle,
               "DMAGENT_DEVICE_DEVICE_ID": DEVICE_ID, "DMAGENT_DEVICE_NAME": DEVICE_NAME,
               "DMAGENT_DEVICE_USER_UPN": UPN, "DMAGENT_TPM_TCTI": tpm}
        env.pop("DMAGENT_CONFIG", None)
        status.update("running the agent daemon: sync, enroll, report")
        log = base / "agent.log"
        daemon = stack.enter_context(agent_daemon(env, log))
        try:
            wait(lambda: finished(env, lab), args.timeout, daemon)
        except LocalError:
            console.print(f"[red]the demo did not finish[/red]; agent log: {log}")
            for line in log.read_text(errors="replace").splitlines()[-15:]:
                console.print("  " + line, markup=False, highlight=False)
            raise
        status.update("stopping")
        summary = collect(env, lab, base, tpm, ca.url, time.monotonic() - started)
    if args.json:
        app.print_json(summary)
    else:
        print_summary(app, summary)
    return 0


# --- parts -----------------------------------------------------------------------------------

def _free_port_pair() -> int:
    """A port P with P+1 free too: the swtpm TCTI finds the control channel on P+1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as t:
            try:
                t.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise LocalError("no free pair of loopback ports for swtpm")


@contextmanager
def swtpm(state: Path) -> Iterator[str]:
    exe = shutil.which("swtpm")
    if exe is None:
        raise LocalError("swtpm is not installed", advice="apt install swtpm swtpm-tools "
                         "(or run `make demo`, which installs it)")
    state.mkdir(parents=True)
    port = _free_port_pair()
    proc = subprocess.Popen(
        [exe, "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        _stop(proc)


@contextmanager
def agent_daemon(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "-v", "run"], env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _stop(proc)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalError(f"swtpm exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise LocalError("swtpm did not start listening")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --- observing ---------------------------------------------------------------------------------

def agent_json(env: dict[str, str], *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "agent.cli", *args, "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def finished(env: dict[str, str], lab: Any) -> bool:
    """Both certificates installed on the device and their thumbprints known to the lab."""
    nodes = agent_json(env, "status")["scep_nodes"]
    if len(nodes) != 2 or any(n["status"] != 1 for n in nodes):
        return False
    server = {d["scope"]: d["thumbprint"] for d in lab.client.device(DEVICE_ID)["deliveries"]}
    return server == {n["scope"]: n["thumbprint"] for n in nodes}


def wait(predicate: Callable[[], bool], timeout: float,
         daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise LocalError(f"the agent daemon exited with {daemon.returncode}")
        if predicate():
            return
        time.sleep(0.25)
    raise LocalError(f"both certificates were not installed and reported within {timeout:g} s")


def collect(env: dict[str, str], lab: Any, base: Path, tcti: str, scep_url: str,
            seconds: float) -> dict[str, Any]:
    status = agent_json(env, "status")
    certs = {c["thumbprint"]: c for c in agent_json(env, "certs", "list", "--store", "My")}
    device = lab.client.device(DEVICE_ID)
    server = {d["scope"]: d for d in device["deliveries"]}
    enrollments = []
    for node in status["scep_nodes"]:
        cert = certs.get(node["thumbprint"], {})
        srv = server.get(node["scope"], {})
        enrollments.append({
            "scope": node["scope"], "unique_id": node["unique_id"],
            "profile": srv.get("profile_id", ""), "status": node["status"],
            "error_code": node["error_code"], "thumbprint": node["thumbprint"],
            "server_thumbprint": srv.get("thumbprint"), "server_status": srv.get("status"),
            "subject": cert.get("subject", ""), "expires": cert.get("not_after", ""),
            "key_store": cert.get("key_store", "")})
    events = agent_json(env, "events")
    return {
        "device": {"id": DEVICE_ID, "name": DEVICE_NAME, "user": UPN, "tpm": tcti},
        "servers": {"mdm": lab.url, "scep": scep_url},
        "enrollments": enrollments,
        "events": [f"{e['id']:>3} {e['message']}" for e in events],
        "crs": [{k: c.get(k) for k in ("status", "reason", "thumbprint")}
                for c in device.get("crs", [])],
        "files": {"agent state": str(base / "agent"), "agent log": str(base / "agent.log"),
                  "lab": str(base / "lab"), "scepserver depot": str(base / "micromdm"),
                  "swtpm state": str(base / "tpm")},
        "seconds": round(seconds, 1),
    }


def print_summary(app: App, s: dict[str, Any]) -> None:
    d = s["device"]
    app.print(f"dmagent demo: finished in {s['seconds']} s")
    app.print(f"  device  {d['name']} ({d['id']}), user {d['user']}, TPM {d['tpm']}")
    app.print(f"  MDM     {s['servers']['mdm']}")
    app.print(f"  SCEP    {s['servers']['scep']} (micromdm scepserver + lab validator)")
    app.print("")
    for e in s["enrollments"]:
        same = "reported" if e["server_thumbprint"] == e["thumbprint"] else "NOT reported"
        app.print(f"  [{e['scope']}] profile {e['profile']}  key: {e['key_store']}")
        app.print(f"    {e['subject']}  expires {e['expires'][:10]}")
        app.print(f"    device: Status {e['status']}  ErrorCode {e['error_code']}  "
                  f"CertThumbprint {e['thumbprint']}")
        app.print(f"    server: Status {e['server_status']}  CertThumbprint "
                  f"{e['server_thumbprint']}  ({same})")
    app.print("")
    app.print("  connector records (CRS): " + ", ".join(
        f"{c['status']}" + (f" ({c['reason']})" if c.get("reason") else "") for c in s["crs"]))
    app.print(f"  events ({len(s['events'])}, `dmagent events` shows them in full):")
    for line in s["events"]:
        app.print("    " + (line if len(line) <= 96 else line[:93] + "..."))
    app.print("")
    app.print("  files:")
    for name, path in s["files"].items():
        app.print(f"    {name:<17} {path}")
    app.print("  try:   dmagent --state-dir " + s["files"]["agent state"] + " status")
