"""The lab directory: configuration (`lab.toml`), key material, the state database, profiles.

Layout (created by `dmagent lab init`):

    lab.toml              settings (account id, session and delivery policy, SCEP URL/CA/depot)
    control.token         the control API's bearer token (0600)
    state.db              SQLite state shared by the server and the CSR validator processes
    profiles/*.toml       SCEP profiles (examples copied at init)
    tls/ca.pem, ca.key    the lab TLS CA (the agent trusts it through server.ca_bundle)
    tls/server.pem, .key  the HTTPS server certificate for 127.0.0.1 and localhost
    challenge/signer.pem, signer.key   the challenge signing key (ECDSA P-256)
    challenge/encrypt.key              AES-256 key encrypting the challenge claims
    csrverifier           wrapper for micromdm `scepserver -csrverifierexec` (see validator)
    server.json           where a running `lab serve` listens (url, port, pid)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tomllib
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from lab import pki
from lab.challenge import Signer, thumbprint
from lab.profiles import EXAMPLE_DIR as EXAMPLE_PROFILES
from lab.profiles import ScepProfile, load_profiles


class LabConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SessionPolicy:
    cmd_ids: str = "uuid"  # uuid (like Intune) | counter
    max_commands_per_message: int = 0  # 0: no limit (the client's MaxMsgSize still applies)
    max_msg_size: int = 0  # MaxMsgSize the server advertises (0: none); small values make the
    #                        client split its answers into several messages and chunks
    auth: str = "none"  # none | md5 (syncml:auth-md5 challenge on package 1)
    auth_username: str = ""  # "": the DeviceID
    auth_password: str = ""
    inventory: bool = True  # Get DevDetail name/serial on a device's first session


@dataclass(frozen=True)
class ChallengePolicy:
    validity_minutes: int = 60
    encrypt: bool = True


@dataclass(frozen=True)
class DeliveryPolicy:
    install_verb: str = "Replace"  # Replace (Intune) | Add, for the first delivery of a node
    followup: bool = True  # Get Status/ErrorCode/CertThumbprint at later sessions
    retry_failed: bool = True  # re-send a failed profile (new challenge) at later sessions
    retry_after_sessions: int = 1  # sessions to wait after a failure before re-sending
    max_attempts: int = 0  # deliveries per node before giving up; 0: no limit
    nodecache: bool = False  # set NodeCache up and Get ChangedNodes like Intune
    remove_on_unassign: bool = True  # Delete the node when the profile is unassigned


@dataclass(frozen=True)
class LabConfig:
    account_id: str = ""
    provider_id: str = "MS DM Server"
    server_path: str = "/ManagementServer/MDM.svc"
    scep_url: str = ""  # default ServerURL for profiles without scep_urls
    scep_ca: str = ""  # CA certificate file: default trusted root + CAThumbprint
    scep_depot: str = ""  # micromdm depot dir: issued certificates, looked up by thumbprint
    profiles_dir: str = "profiles"
    session: SessionPolicy = field(default_factory=SessionPolicy)
    challenge: ChallengePolicy = field(default_factory=ChallengePolicy)
    delivery: DeliveryPolicy = field(default_factory=DeliveryPolicy)


_SECTIONS = {"session": SessionPolicy, "challenge": ChallengePolicy, "delivery": DeliveryPolicy}
_CHOICES = {("session", "cmd_ids"): ("uuid", "counter"), ("session", "auth"): ("none", "md5"),
            ("delivery", "install_verb"): ("Replace", "Add")}


def _coerce(section: str, cls: type, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise LabConfigError(f"lab.toml: unknown key {section + '.' if section else ''}{key}")
        default = getattr(cls(), key)
        if isinstance(default, bool) != isinstance(value, bool) or \
                not isinstance(value, type(default)):
            raise LabConfigError(f"lab.toml: {section + '.' if section else ''}{key} must be "
                                 f"a {type(default).__name__}")
        choices = _CHOICES.get((section, key))
        if choices and value not in choices:
            raise LabConfigError(f"lab.toml: {section}.{key} must be one of {', '.join(choices)}")
        out[key] = value
    return cls(**out)


def parse_config(data: dict[str, Any]) -> LabConfig:
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    cfg: LabConfig = _coerce("", LabConfig, top)
    for name, cls in _SECTIONS.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise LabConfigError(f"lab.toml: [{name}] must be a table")
        cfg = replace(cfg, **{name: _coerce(name, cls, section)})
    try:
        uuid.UUID(cfg.account_id)
    except ValueError:
        raise LabConfigError(f"lab.toml: account_id {cfg.account_id!r} is not a GUID") from None
    return cfg


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def render_config(cfg: LabConfig) -> str:
    lines = ["# dmagent lab settings (see lab/labdir.py for what each key does)."]
    for f in fields(cfg):
        if f.name not in _SECTIONS:
            lines.append(f"{f.name} = {_toml_value(getattr(cfg, f.name))}")
    for name in _SECTIONS:
        lines.append(f"\n[{name}]")
        section = getattr(cfg, name)
        lines.extend(f"{f.name} = {_toml_value(getattr(section, f.name))}"
                     for f in fields(section))
    return "\n".join(lines) + "\n"


class LabDir:
    """Paths and lazily loaded material of one lab directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()
        self._signer: Signer | None = None
        self._enc_key: bytes | None = None

    @property
    def config_path(self) -> Path:
        return self.path / "lab.toml"
    @property
    def db_path(self) -> Path:
        return self.path / "state.db"
    @property
    def token_path(self) -> Path:
        return self.path / "control.token"
    @property
    def ca_cert_path(self) -> Path:
        return self.path / "tls" / "ca.pem"
    @property
    def ca_key_path(self) -> Path:
        return self.path / "tls" / "ca.key"
    @property
    def server_cert_path(self) -> Path:
        return self.path / "tls" / "server.pem"
    @property
    def server_key_path(self) -> Path:
        return self.path / "tls" / "server.key"
    @property
    def signer_cert_path(self) -> Path:
        return self.path / "challenge" / "signer.pem"
    @property
    def signer_key_path(self) -> Path:
        return self.path / "challenge" / "signer.key"
    @property
    def encryption_key_path(self) -> Path:
        return self.path / "challenge" / "encrypt.key"
    @property
    def verifier_path(self) -> Path:
        return self.path / "csrverifier"
    @property
    def server_info_path(self) -> Path:
        return self.path / "server.json"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> LabConfig:
        try:
            data = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LabConfigError(f"{self.path} is not a lab directory (no lab.toml); "
                                 f"run `dmagent lab init --dir {self.path}`") from None
        except tomllib.TOMLDecodeError as exc:
            raise LabConfigError(f"{self.config_path}: invalid TOML: {exc}") from None
        return parse_config(data)

    def save_config(self, cfg: LabConfig) -> None:
        pki.write_private(self.config_path, render_config(cfg).encode())

    def update_config(self, **changes: Any) -> LabConfig:
        cfg = replace(self.config(), **changes)
        self.save_config(cfg)
        return cfg

    @property
    def profiles_path(self) -> Path:
        return self.path / self.config().profiles_dir

    def profiles(self) -> dict[str, ScepProfile]:
        return load_profiles(self.profiles_path)

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def signer(self) -> Signer:
        if self._signer is None:  # loaded once per process: the server signs per delivery
            self._signer = Signer(pki.load_key(self.signer_key_path),
                                  pki.load_cert(self.signer_cert_path))
        return self._signer

    def signer_certs(self) -> dict[str, x509.Certificate]:
        """Every certificate whose key may have signed a live challenge (by thumbprint)."""
        certs = [pki.load_cert(self.signer_cert_path)]
        old = self.path / "challenge" / "previous"
        if old.is_dir():
            certs += [pki.load_cert(p) for p in sorted(old.glob("*.pem"))]
        return {thumbprint(c): c for c in certs}

    def encryption_key(self, cfg: LabConfig | None = None) -> bytes | None:
        if not (cfg or self.config()).challenge.encrypt:
            return None
        if self._enc_key is None:
            key = self.encryption_key_path.read_bytes()
            if len(key) != 32:
                raise LabConfigError(f"{self.encryption_key_path}: not a 32-byte AES key")
            self._enc_key = key
        return self._enc_key

    def server_info(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.server_info_path.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def write_verifier(self, python: str | None = None) -> Path:
        """The executable micromdm runs per CSR: exec the lab validator on this directory.

        micromdm 2.1.0 (csrverifier/executable) runs the file with no arguments, writes the
        decrypted CSR (DER) to its stdin and treats any non-zero exit as "refuse" (the client
        then gets CertRep FAILURE, failInfo badRequest).
        """
        py = python or sys.executable
        repo = Path(__file__).resolve().parent.parent
        script = (
            "#!/bin/sh\n"
            "# Generated by `dmagent lab init`: micromdm scepserver -csrverifierexec target.\n"
            f"PYTHONPATH={_sh_quote(str(repo))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
            "export PYTHONPATH\n"
            f"exec {_sh_quote(py)} -m agent.cli lab verify-csr --lab-dir "
            f"{_sh_quote(str(self.path))}\n")
        self.verifier_path.write_text(script)
        self.verifier_path.chmod(0o755)
        return self.verifier_path


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def init_lab(path: Path, *, force: bool = False, account_id: str | None = None,
             copy_examples: bool = True, auth: str = "none", **config_changes: Any) -> LabDir:
    """Create a lab directory (keys, token, config, profiles, validator wrapper, empty DB)."""
    from lab.state import LabState

    lab = LabDir(path)
    if lab.exists() and not force:
        raise LabConfigError(f"{lab.path} is already a lab directory (use --force to "
                             f"re-create its keys and state)")
    lab.path.mkdir(parents=True, exist_ok=True)
    os.chmod(lab.path, 0o700)
    now = pki.utcnow()
    ca_key, ca_cert = pki.make_ca("dmagent lab TLS CA", now)
    srv_key, srv_cert = pki.make_server_cert(ca_key, ca_cert, now)
    sig_key, sig_cert = pki.make_signer(now)
    pki.write_key(lab.ca_key_path, ca_key)
    pki.write_cert(lab.ca_cert_path, ca_cert)
    pki.write_key(lab.server_key_path, srv_key)
    pki.write_cert(lab.server_cert_path, srv_cert)
    pki.write_key(lab.signer_key_path, sig_key)
    pki.write_cert(lab.signer_cert_path, sig_cert)
    pki.write_private(lab.encryption_key_path, secrets.token_bytes(32))
    pki.write_private(lab.token_path, (secrets.token_urlsafe(32) + "\n").encode())
    cfg = LabConfig(account_id=(account_id or str(uuid.uuid4())).lower(),
                    session=SessionPolicy(auth=auth, auth_password=secrets.token_urlsafe(12)))
    cfg = replace(cfg, **config_changes)
    lab.save_config(cfg)
    profiles = lab.path / cfg.profiles_dir
    profiles.mkdir(exist_ok=True)
    if copy_examples:
        for example in sorted(EXAMPLE_PROFILES.glob("*.toml")):
            if not (profiles / example.name).exists():
                shutil.copyfile(example, profiles / example.name)
    if force and lab.db_path.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(str(lab.db_path) + suffix).unlink(missing_ok=True)
    LabState(lab.db_path).close()
    lab.write_verifier()
    return lab
