"""Configuration: frozen dataclasses read once from TOML and `DMAGENT_*` environment variables.

Precedence (later wins): defaults < TOML file < environment < command-line overrides.
The file is `--config PATH`, else `$DMAGENT_CONFIG`, else `<platformdirs site config>/config.toml`
(absent is fine). Environment names are derived from the schema: `DMAGENT_<SECTION>_<KEY>`
(e.g. `DMAGENT_SERVER_URL`, `DMAGENT_TPM_TCTI`) and `DMAGENT_<KEY>` for top-level keys
(`DMAGENT_STATE_DIR`). Every validation error names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from agent.errors import ConfigError

APP = "dmagent"


def default_state_dir() -> Path:
    """systemd's $STATE_DIRECTORY under a service; else platformdirs (site dir for root)."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    import platformdirs

    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path(platformdirs.site_data_dir(APP))
    return Path(platformdirs.user_state_dir(APP))


@dataclass(frozen=True)
class DeviceConfig:
    """Who this device says it is (DevInfo / DevDetail, the user hive)."""

    device_id: str = ""  # DevInfo/DevId; default: derived from /etc/machine-id
    name: str = ""  # DevDetail/Ext/Microsoft/DeviceName; default: the host name
    manufacturer: str = "dmagent"
    model: str = "Virtual Device"
    language: str = "en-US"
    os_version: str = "10.0.22631.4460"
    user_sid: str = ""  # the interactive user's SID; default: derived from device_id
    user_upn: str = ""  # the interactive user's UPN (LoginStatus / user-scope profiles)


@dataclass(frozen=True)
class ServerConfig:
    """The OMA-DM server (the enrollment's ADDR) and how to authenticate to it."""

    url: str = ""
    verify_tls: bool = True
    ca_bundle: str = ""  # PEM file with the server's trusted roots; "" = system store
    client_cert: str = ""  # PEM certificate (+ key) for mutual TLS
    client_key: str = ""
    auth: str = "none"  # none | basic | md5 (SyncML credentials)
    username: str = ""
    password: str = ""
    timeout: float = 60.0
    max_response_bytes: int = 4 * 1024 * 1024  # a larger SyncML response is refused unread


@dataclass(frozen=True)
class TpmConfig:
    tcti: str = ""  # "" = no TPM; e.g. "swtpm:host=127.0.0.1,port=2321", "device:/dev/tpmrm0"


@dataclass(frozen=True)
class ScepConfig:
    user_agent: str = "Mozilla/4.0 (compatible; Win32; NDES client 10.0.22631.1/ni_release)"
    timeout: float = 60.0
    max_response_bytes: int = 10 * 1024 * 1024
    windows_url_form: bool = True  # append /pkiclient.exe and send message=default like Windows


@dataclass(frozen=True)
class TasksConfig:
    """The dmcertinst task trigger: 3 attempts, 1 minute apart (tests shorten the minute)."""

    attempts: int = 3
    interval_seconds: float = 60.0
    # RetryDelay (PENDING polling) is in minutes on the wire; this is how long a minute is.
    minute_seconds: float = 60.0


@dataclass(frozen=True)
class SyncConfig:
    """The daemon's sync schedule (the DMClient Poll nodes set the intervals, in minutes)."""

    poll_minute_seconds: float = 60.0  # the length of a poll-schedule minute (tests shorten it)
    on_start: bool = True  # sync when the daemon starts (Windows syncs at boot/logon)
    after_enrollment: bool = True  # sync right after an enrollment finishes, to report it
    # Also report a finished enrollment with a generic Alert 1226 at the next session. Off by
    # default: Windows' payload for it is undocumented (the Type below is this agent's).
    alert_1226: bool = False


@dataclass(frozen=True)
class Config:
    state_dir: Path = field(default_factory=default_state_dir)
    log_level: str = "info"
    device: DeviceConfig = field(default_factory=DeviceConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    tpm: TpmConfig = field(default_factory=TpmConfig)
    scep: ScepConfig = field(default_factory=ScepConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    source: str = "defaults"  # where the config came from, for messages

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.db"

    @property
    def events_path(self) -> Path:
        return self.state_dir / "events.jsonl"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    def resolved_device(self, stored_id: str = "", stored_sid: str = "",
                        stored_name: str = "") -> DeviceConfig:
        """DeviceConfig with the gaps filled: what the configuration says wins, then what the
        device's store remembers (`stored_*`), then values derived from the machine."""
        d = self.device
        device_id = d.device_id or stored_id or _machine_device_id()
        sid = d.user_sid or (stored_sid if device_id == stored_id else "") or \
            derived_user_sid(device_id)
        return dataclasses.replace(
            d, device_id=device_id, name=d.name or stored_name or socket.gethostname(),
            user_sid=sid)


_LOG_LEVELS = ("debug", "info", "warning", "error")
_AUTH = ("none", "basic", "md5")


def default_config_path() -> Path:
    import platformdirs

    return Path(platformdirs.site_config_dir(APP)) / "config.toml"


def derived_user_sid(device_id: str) -> str:
    """A stable Azure AD-style user SID (S-1-12-1-a-b-c-d) for the emulated interactive user."""
    import hashlib

    digest = hashlib.sha256(f"user:{device_id}".encode()).digest()
    parts = [int.from_bytes(digest[i: i + 4], "little") for i in range(0, 16, 4)]
    return "S-1-12-1-" + "-".join(str(p) for p in parts)


def _machine_device_id() -> str:
    import uuid

    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = socket.gethostname()
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"dmagent:{machine_id}"))


def load_config(path: Path | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Read the config once. `overrides` uses dotted keys (`{"state_dir": ...}`)."""
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("DMAGENT_CONFIG"))
    cfg_path = path or (Path(env["DMAGENT_CONFIG"]) if env.get("DMAGENT_CONFIG")
                        else default_config_path())
    data: dict[str, Any] = {}
    source = "defaults"
    try:
        with cfg_path.open("rb") as fh:
            import tomllib  # only when there is a file (~5 ms of a start otherwise)

            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{cfg_path}: invalid TOML: {exc}") from None
        source = str(cfg_path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file not found: {cfg_path}") from None
    except OSError as exc:
        raise ConfigError(f"{cfg_path}: cannot read: {exc.strerror}") from None

    merged: dict[str, tuple[Any, str]] = {}
    _flatten(data, "", source, merged)
    for name, (dotted, _) in _env_names().items():
        if name in env:
            merged[dotted] = (env[name], f"environment variable {name}")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            merged[dotted] = (value, "command line")
    unknown = set(merged) - set(_schema_keys())
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{merged[key][1]}: unknown setting {key!r}")
    cfg: Config = _build(Config, "", merged)
    _validate(cfg, merged)
    return dataclasses.replace(cfg, source=source)


def _validate(cfg: Config, merged: Mapping[str, tuple[Any, str]]) -> None:
    def fail(key: str, problem: str) -> None:
        where = merged[key][1] if key in merged else "defaults"
        raise ConfigError(f"{where}: {key} {problem}")

    if cfg.log_level not in _LOG_LEVELS:
        fail("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
    if cfg.server.auth not in _AUTH:
        fail("server.auth", f"must be one of {', '.join(_AUTH)}")
    if cfg.tasks.attempts < 1:
        fail("tasks.attempts", "must be at least 1")
    for key in ("interval_seconds", "minute_seconds"):
        if getattr(cfg.tasks, key) < 0:
            fail(f"tasks.{key}", "must not be negative")
    if cfg.sync.poll_minute_seconds <= 0:
        fail("sync.poll_minute_seconds", "must be positive")


def _flatten(data: Mapping[str, Any], prefix: str, source: str,
             out: dict[str, tuple[Any, str]]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, dotted + ".", source, out)
        else:
            out[dotted] = (value, source)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """(name, type) of a config dataclass's settings; the string annotations are evaluated
    once per class (get_type_hints is the costly part of reading the config)."""
    hints = get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.name != "source")


@functools.cache
def _schema_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for name, typ in _fields(cls):
        if dataclasses.is_dataclass(typ):
            keys += _schema_keys(typ, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            keys.append(prefix + name)
    return tuple(keys)


def _env_names() -> dict[str, tuple[str, None]]:
    return {"DMAGENT_" + k.replace(".", "_").upper(): (k, None) for k in _schema_keys()}


def _build(cls: type, prefix: str, merged: Mapping[str, tuple[Any, str]]) -> Any:
    kwargs: dict[str, Any] = {}
    for name, typ in _fields(cls):
        dotted = prefix + name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, dotted + ".", merged)  # type: ignore[arg-type]
        elif dotted in merged:
            value, where = merged[dotted]
            kwargs[name] = _coerce(value, typ, dotted, where)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Convert a TOML or environment value to the field's type, or say what is wrong."""
    if get_origin(typ) in (Union, types.UnionType):
        typ = next(a for a in get_args(typ) if a is not type(None))
    from_env = isinstance(value, str) and where.startswith("environment")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if from_env and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
        elif typ is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if from_env:
                return int(value)
        elif typ is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if from_env:
                return float(value)
        elif typ is str:
            if isinstance(value, str):
                return value
        elif typ is Path and isinstance(value, str | Path):
            return Path(value).expanduser()
    except ValueError:
        pass
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{where}: {key}: expected {name}, got {value!r}")
