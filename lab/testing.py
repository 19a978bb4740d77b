"""Helpers for tests and demos: the lab server in a fixture (`LabServer`), micromdm scepserver
wired to the lab validator (`micromdm_with_validator`), CSRs built like Windows builds them from
a delivered profile (`build_csr`), and a scripted device (`ScriptedTree` + `run_session`: the
agent's SyncML session with an in-memory DM tree).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AttributeOID, ObjectIdentifier

from agent.syncml.auth import Credentials
from agent.syncml.messages import (
    Cmd,
    Command,
    Container,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
)
from agent.syncml.session import (
    ClientSession,
    DeviceInfo,
    SendMessage,
    SessionComplete,
    SessionConfig,
    SessionFailed,
)
from lab.control import HttpControl
from lab.csrcheck import UPN_OID
from lab.labdir import LabConfig, LabDir, init_lab
from lab.server import Running, start_in_thread
from lab.state import LabState

CsrKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _der_utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) < 0x80:
        return bytes([0x0C, len(raw)]) + raw
    n = (len(raw).bit_length() + 7) // 8
    return bytes([0x0C, 0x80 | n]) + len(raw).to_bytes(n, "big") + raw


def general_name(san_type: int, value: str) -> x509.GeneralName:
    if san_type == 2:
        return x509.RFC822Name(value)
    if san_type == 3:
        return x509.DNSName(value)
    if san_type == 7:
        return x509.UniformResourceIdentifier(value)
    if san_type == 8:
        return x509.IPAddress(ipaddress.ip_address(value))
    if san_type == 9:
        return x509.RegisteredID(ObjectIdentifier(value))
    if san_type in (1, 11):
        return x509.OtherName(ObjectIdentifier(UPN_OID), _der_utf8(value))
    raise ValueError(f"unsupported SAN type {san_type}")


def key_usage_ext(bits: int) -> x509.KeyUsage:
    agree = bool(bits & 0x08)
    return x509.KeyUsage(
        digital_signature=bool(bits & 0x80), content_commitment=bool(bits & 0x40),
        key_encipherment=bool(bits & 0x20), data_encipherment=bool(bits & 0x10),
        key_agreement=agree, key_cert_sign=bool(bits & 0x04), crl_sign=bool(bits & 0x02),
        encipher_only=agree and bool(bits & 0x01), decipher_only=agree and bool(bits & 0x8000))


def build_csr(key: CsrKey, *, subject: Sequence[tuple[str, str]],
              sans: Sequence[tuple[int, str]] = (), ekus: Sequence[str] = (),
              key_usage: int | None = None, challenge: str | None = None) -> bytes:
    """A DER PKCS#10 with the given subject pairs, SANs, EKUs, key usage and challengePassword."""
    name = x509.Name([x509.NameAttribute(ObjectIdentifier(oid), value) for oid, value in subject])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([general_name(t, v) for t, v in sans]), critical=False)
    if ekus:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ObjectIdentifier(o) for o in ekus]), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(key_usage_ext(key_usage), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --- the lab server in a fixture ------------------------------------------------------------

class LabServer:
    """The lab's OMA-DM server over HTTPS on a free loopback port, in a thread.

        with LabServer() as lab:            # fresh lab dir (temporary unless `directory=`)
            lab.url                         # https://127.0.0.1:<port>/ManagementServer/MDM.svc
            lab.ca_bundle                   # the TLS CA the agent must trust (server.ca_bundle)
            lab.client.assign("device-client-auth", device="dev1")   # the control API
            lab.configure(session={"auth": "md5"})                  # edits lab.toml live
    """

    def __init__(self, directory: Path | None = None, *, clock: Any = None,
                 config: dict[str, Any] | None = None, **init_kwargs: Any) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dmagent-lab-")
            directory = Path(self._tmp.name) / "lab"
        self.lab = LabDir(directory)
        self._clock = clock
        self._config = config or {}
        self._init = init_kwargs
        self._run: Running | None = None
        self.client: HttpControl | None = None

    def start(self) -> LabServer:
        if not self.lab.exists():
            init_lab(self.lab.path, **self._init)
        if self._config:
            self.configure(**self._config)
        self._run = start_in_thread(self.lab, clock=self._clock)
        self.client = HttpControl(self._run.base_url, self.lab.token(), self.ca_bundle)
        return self

    def configure(self, **changes: Any) -> LabConfig:
        """Change lab.toml (top-level keys, or a dict per section); the server re-reads it."""
        cfg = self.lab.config()
        top: dict[str, Any] = {}
        for key, value in changes.items():
            if isinstance(value, dict):
                top[key] = dataclasses.replace(getattr(cfg, key), **value)
            else:
                top[key] = value
        return self.lab.update_config(**top)

    @property
    def running(self) -> Running:
        if self._run is None:
            raise RuntimeError("LabServer not started")
        return self._run

    @property
    def url(self) -> str:
        return self.running.mdm_url

    @property
    def base_url(self) -> str:
        return self.running.base_url

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def ca_bundle(self) -> str:
        return str(self.lab.ca_cert_path)

    @property
    def state(self) -> LabState:
        """The server's own state handle (same process): for assertions in tests."""
        return self.running.app.state

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._run is not None:
            self._run.stop()
            self._run = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- micromdm scepserver with the lab validator -----------------------------------------------

@dataclass
class MicromdmInstance:
    port: int
    depot: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/scep"

    @property
    def ca_pem(self) -> Path:
        return self.depot / "ca.pem"

    @property
    def ca_thumbprint(self) -> str:
        from lab.challenge import thumbprint
        from lab.pki import load_cert

        return thumbprint(load_cert(self.ca_pem))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def micromdm_with_validator(lab_dir: Path | LabDir, workdir: Path, *,
                            challenge: str | None = None, depot: Path | None = None,
                            valid_days: int = 365, allow_renew: int = 0,
                            configure_lab: bool = True, binary: str | None = None,
                            timeout: float = 10.0) -> MicromdmInstance:
    """Start micromdm `scepserver` whose CSRs are decided by the lab validator.

    `-challenge` is refused: scepserver 2.1.0 runs its static challenge check *after* the
    `-csrverifierexec` verifier and both must pass, so no lab challenge could ever succeed.
    With `configure_lab`, the lab's scep_url/scep_ca/scep_depot point at this instance.
    """
    if challenge:
        raise ValueError("micromdm's static -challenge cannot be combined with the lab "
                         "validator: scepserver checks both, and a lab challenge is never the "
                         "static one; leave challenge unset")
    lab = lab_dir if isinstance(lab_dir, LabDir) else LabDir(lab_dir)
    exe = binary or shutil.which("scepserver")
    if exe is None:
        raise FileNotFoundError("scepserver not installed (apt install scep)")
    workdir.mkdir(parents=True, exist_ok=True)
    if depot is None:
        depot = workdir / "depot"
        subprocess.run([exe, "ca", "-init", "-depot", str(depot), "-keySize", "2048"],
                       check=True, capture_output=True)
    verifier = lab.write_verifier()
    log_path = workdir / "scepserver.log"
    last_error = ""
    for _ in range(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        argv = [exe, "-depot", str(depot), "-port", str(port), "-allowrenew", str(allow_renew),
                "-crtvalid", str(valid_days), "-csrverifierexec", str(verifier)]
        with log_path.open("ab") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        inst = MicromdmInstance(port, depot, proc, log_path)
        try:
            _wait_caps(inst, proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            last_error = str(exc)
            inst.stop()
            continue
        if configure_lab:
            lab.update_config(scep_url=inst.url, scep_ca=str(inst.ca_pem),
                              scep_depot=str(depot))
        return inst
    raise RuntimeError(f"could not start scepserver: {last_error}")


def _wait_caps(inst: MicromdmInstance, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"scepserver exited with {proc.returncode}: {inst.log()[-500:]}")
        try:
            url = inst.url + "?operation=GetCACaps"  # http://127.0.0.1 only
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("scepserver did not answer GetCACaps")
        time.sleep(0.05)


# --- a scripted device --------------------------------------------------------------------------
# The agent's own SyncML session (codec, packing, auth, large objects) over real HTTPS, with a
# small in-memory DM tree whose answers a test sets.

@dataclass
class ScriptedTree:
    """Nodes as a dict; Atomic all-or-nothing; `on_exec` hooks an Exec (e.g. Enroll)."""

    values: dict[str, str] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)  # uri → status to answer
    executed: list[tuple[str, str]] = field(default_factory=list)  # (command, uri)
    on_exec: Callable[[str], None] | None = None

    def execute(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]:
        out: list[Status | Results] = []
        for c in commands:
            out.extend(self._one(c, msg_ref))
        return out

    def _one(self, c: Command, msg_ref: str) -> list[Status | Results]:
        if isinstance(c, Container):
            snapshot = dict(self.values)
            inner: list[Status | Results] = []
            for sub in c.commands:
                inner.extend(self._one(sub, msg_ref))
            ok = all(s.data < 300 for s in inner if isinstance(s, Status))
            if not ok:
                self.values = snapshot
                inner = [s if not isinstance(s, Status) or s.data >= 300
                         else Status("", msg_ref, s.cmd_ref, s.cmd, 216) for s in inner]
            return [Status("", msg_ref, str(c.cmd_id), c.kind.value, 200 if ok else 507), *inner]
        if not isinstance(c, ItemCommand):
            return [Status("", msg_ref, str(c.cmd_id), type(c).__name__, 406)]
        uri = (c.items[0].target or "") if c.items else ""
        self.executed.append((c.kind.value, uri))
        if uri in self.fail:
            return [Status("", msg_ref, str(c.cmd_id), c.kind.value, self.fail[uri])]
        if c.kind is Cmd.GET and uri.endswith("/ChangedNodes") and "/NodeCache/" in uri:
            # NodeCache: the ids whose NodeURI's value differs from ExpectedValue
            base = uri.rsplit("/", 1)[0] + "/Nodes/"
            ids = sorted({k[len(base):].split("/")[0] for k in self.values if k.startswith(base)})
            changed = [i for i in ids if self.values.get(self.values.get(
                f"{base}{i}/NodeURI", ""), None) != self.values.get(f"{base}{i}/ExpectedValue")]
            return [Status("", msg_ref, str(c.cmd_id), "Get", 200),
                    Results("", msg_ref, str(c.cmd_id), (Item(
                        source=uri, meta=Meta(format="chr"), data=",".join(changed)),))]
        if c.kind is Cmd.GET:
            if uri not in self.values:
                return [Status("", msg_ref, str(c.cmd_id), "Get", 404)]
            return [Status("", msg_ref, str(c.cmd_id), "Get", 200),
                    Results("", msg_ref, str(c.cmd_id), (Item(
                        source=uri, meta=Meta(format="chr"), data=self.values[uri]),))]
        if c.kind in (Cmd.ADD, Cmd.REPLACE):
            if c.kind is Cmd.ADD and uri in self.values:
                return [Status("", msg_ref, str(c.cmd_id), "Add", 418)]
            self.values[uri] = c.items[0].data or ""
            return [Status("", msg_ref, str(c.cmd_id), c.kind.value, 200)]
        if c.kind is Cmd.DELETE:
            gone = [k for k in self.values if k == uri or k.startswith(uri + "/")]
            for k in gone:
                del self.values[k]
            return [Status("", msg_ref, str(c.cmd_id), "Delete", 200 if gone else 404)]
        if c.kind is Cmd.EXEC:
            if self.on_exec is not None:
                self.on_exec(uri)
            return [Status("", msg_ref, str(c.cmd_id), "Exec", 200)]
        return [Status("", msg_ref, str(c.cmd_id), c.kind.value, 406)]


@dataclass
class Exchange:
    sent: list[bytes] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    http_status: list[int] = field(default_factory=list)


def run_session(url: str, ca_bundle: str, device_id: str, tree: ScriptedTree, *,
                session_id: str = "1", credentials: Credentials | None = None,
                nonce: bytes | None = None, stop_after: int | None = None,
                ) -> tuple[SessionComplete | SessionFailed | None, Exchange]:
    """One session; `stop_after=n` walks away after n round trips (no further messages)."""
    cfg = SessionConfig(server_url=url, device=DeviceInfo(device_id, "dmagent", "lab test"),
                        session_id=session_id, credentials=credentials, nonce=nonce)
    session = ClientSession(cfg, tree)
    ex = Exchange()
    event: SendMessage | SessionComplete | SessionFailed = session.start()
    with httpx.Client(verify=ssl.create_default_context(cafile=ca_bundle), timeout=30) as client:
        while isinstance(event, SendMessage):
            if stop_after is not None and len(ex.sent) >= stop_after:
                return None, ex
            ex.sent.append(event.body)
            resp = client.post(url + "?mode=Maintenance&Platform=WoA", content=event.body,
                               headers={"Content-Type": "application/vnd.syncml.dm+xml"})
            ex.http_status.append(resp.status_code)
            ex.received.append(resp.content)
            event = session.receive(resp.content)
    return event, ex
