"""Shared fixtures: real parts (swtpm, micromdm scepserver) on free loopback ports.

Tests that need a binary are marked; they skip with a clear reason only when the binary is
missing on this machine. CI installs them through `make test`, and setting DMAGENT_REQUIRE_PARTS=1
(the Makefile does) turns a missing binary into a failure, so CI never skips silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE_PARTS = os.environ.get("DMAGENT_REQUIRE_PARTS") == "1"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE_PARTS:
            pytest.fail(f"{name} is required (DMAGENT_REQUIRE_PARTS=1) but not installed")
        pytest.skip(f"{name} not installed (apt install {_PACKAGE.get(name, name)})")
    return path


_PACKAGE = {"swtpm": "swtpm swtpm-tools", "scepserver": "scep", "scepclient": "scep"}


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- swtpm ----------------------------------------------------------------------------------

@dataclass
class SwtpmInstance:
    port: int
    ctrl_port: int
    state_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def start_swtpm(state_dir: Path) -> SwtpmInstance:
    binary = need_binary("swtpm")
    state_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # a port taken between free_port() and bind: try others
        # libtss2's swtpm TCTI has no option for the control port: it always uses port + 1
        # (tcti-swtpm.c), and fails to initialise when nothing answers there.
        port = free_port()
        ctrl = port + 1
        proc = subprocess.Popen(
            [binary, "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(port, proc)
            wait_for_port(ctrl, proc)
            return SwtpmInstance(port, ctrl, state_dir, proc)
        except RuntimeError:
            continue
    raise RuntimeError("could not start swtpm")


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[Callable[[], SwtpmInstance]]:
    """Start fresh swtpm instances (each with its own state); all stopped at teardown."""
    started: list[SwtpmInstance] = []

    def make() -> SwtpmInstance:
        inst = start_swtpm(tmp_path / f"swtpm{len(started)}")
        started.append(inst)
        return inst

    yield make
    for inst in started:
        inst.stop()


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmInstance]:
    """One swtpm shared by the session (keys are created under a fresh primary each time)."""
    inst = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    yield inst
    inst.stop()


# --- micromdm scepserver ----------------------------------------------------------------------

@dataclass
class ScepServerInstance:
    port: int
    depot: Path
    challenge: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/scep"

    @property
    def ca_cert_pem(self) -> Path:
        return self.depot / "ca.pem"

    @property
    def ca_thumbprint(self) -> str:
        """SHA-1 of the CA certificate (what CAThumbprint carries), upper-case hex."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = x509.load_pem_x509_certificate(self.ca_cert_pem.read_bytes())
        return cert.fingerprint(hashes.SHA1()).hex().upper()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def start_scepserver(workdir: Path, *, challenge: str = "secret",
                     csr_verifier: str | None = None, allow_renew: int = 0,
                     valid_days: int = 365, depot: Path | None = None) -> ScepServerInstance:
    binary = need_binary("scepserver")
    workdir.mkdir(parents=True, exist_ok=True)
    if depot is None:
        depot = workdir / "depot"
        subprocess.run([binary, "ca", "-init", "-depot", str(depot), "-keySize", "2048"],
                       check=True, capture_output=True)
    log_path = workdir / "scepserver.log"
    for _ in range(5):
        port = free_port()
        argv = [binary, "-depot", str(depot), "-port", str(port),
                "-allowrenew", str(allow_renew), "-crtvalid", str(valid_days)]
        if challenge:
            argv += ["-challenge", challenge]
        if csr_verifier:
            argv += ["-csrverifierexec", csr_verifier]
        with log_path.open("ab") as log_fh:
            proc = subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
        except RuntimeError:
            continue
        inst = ScepServerInstance(port, depot, challenge, proc, log_path)
        _wait_http_ok(inst.url + "?operation=GetCACaps")
        return inst
    raise RuntimeError("could not start scepserver")


def _wait_http_ok(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


@pytest.fixture
def scepserver_factory(tmp_path: Path) -> Iterator[Callable[..., ScepServerInstance]]:
    """Start micromdm scepserver instances, each with a fresh CA unless `depot=` is given."""
    started: list[ScepServerInstance] = []

    def make(**kwargs: object) -> ScepServerInstance:
        inst = start_scepserver(tmp_path / f"scep{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(inst)
        return inst

    yield make
    for inst in started:
        inst.stop()


@pytest.fixture(scope="session")
def scepserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScepServerInstance]:
    """One scepserver (challenge "secret") shared by the session."""
    inst = start_scepserver(tmp_path_factory.mktemp("scepserver"))
    yield inst
    inst.stop()


# --- the CLI ------------------------------------------------------------------------------------

@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def run_cli(state_dir: Path) -> Callable[..., CliResult]:
    """Run `dmagent` as a user would: a separate process, with a private state dir."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> CliResult:
        full_env = {**os.environ, "DMAGENT_STATE_DIR": str(state_dir),
                    "DMAGENT_CONFIG": os.environ.get("DMAGENT_TEST_CONFIG", ""), **(env or {})}
        if not full_env["DMAGENT_CONFIG"]:
            del full_env["DMAGENT_CONFIG"]
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], input=input, check=False,
                              capture_output=True, text=True, env=full_env, timeout=timeout,
                              cwd=REPO)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


def sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest().upper()


# --- the lab SCEP CA (lab.scepca) ------------------------------------------------------------

@pytest.fixture(scope="session")
def lab_ca_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lab CA (root + NDES RA pair) per session; `lab_scep_ca` copies its keys, so each
    test gets a fresh database without paying for RSA key generation."""
    from datetime import UTC, datetime

    from lab.scepca.ca import CertificateAuthority

    directory = tmp_path_factory.mktemp("lab-ca-template")
    CertificateAuthority.init(directory, now=datetime.now(UTC))
    return directory


@pytest.fixture
def lab_scep_ca(tmp_path: Path, lab_ca_template: Path) -> Iterator[Callable[..., object]]:
    """Start lab SCEP CAs (`lab.scepca.testing.LabScepCA` keyword arguments: mode=,
    challenge=, verifier=, pending=, faults=, …); all stopped at teardown."""
    from lab.scepca.testing import LabScepCA

    started: list[LabScepCA] = []

    def make(**kwargs: object) -> LabScepCA:
        ca = LabScepCA(tmp_path / f"labca{len(started)}", ca_from=lab_ca_template,
                       **kwargs)  # type: ignore[arg-type]
        started.append(ca)
        return ca.start()

    yield make
    for ca in started:
        ca.stop()
