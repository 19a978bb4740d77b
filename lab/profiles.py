"""SCEP certificate profiles, as an Intune admin defines them, read from TOML files.

A profile is the server-side definition; what the device receives is its expansion for one
device (`expand`): variables such as `{{DeviceName}}` filled in from what the lab knows about the
device, rendered into the ClientCertificateInstall Install node values (DESIGN §3). The renewal
threshold stays on the server (seed 000: it never reaches the device).

Naming follows Intune (seeds 000/001): the node is
`ModelName_AC_<AccountId>_LogicalName_<PolicyId with '-' → '_'>_Hash_<n>` and the challenge's
CertificateRequestId is `ModelName=AC_<AccountId>/LogicalName_<...>;Version=<v>;Hash=<n>`, where
`<n>` is a signed 32-bit number that changes whenever the profile's settings change (so an edited
profile lands in a new node, as with Intune).

TOML keys (see `lab/profiles/*.toml` for commented examples):
id, name, scope (device|user), version, subject, san = [{type, value}], ekus, key_usage,
key_length, key_protection, hash_algorithm, validity = {period, units}, renewal_threshold,
retry_count, retry_delay, scep_urls, trusted_root, ca_thumbprint, template_name, container_name,
extra_nodes (raw Install node overrides for negative tests, delivered as-is).
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import x500

EXAMPLE_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile file is invalid; the message names the file and the key."""


class MissingVariableError(ValueError):
    """A variable the profile uses has no value for this device (delivery not possible)."""

    def __init__(self, variable: str) -> None:
        super().__init__(f"{{{{{variable}}}}} has no value for this device")
        self.variable = variable


class Scope(enum.StrEnum):
    DEVICE = "device"
    USER = "user"

    @property
    def uri_root(self) -> str:
        return "./Device" if self is Scope.DEVICE else "./User"


class SanType(enum.IntEnum):
    """CERT_ALT_NAME_* numbers, as SubjectAlternativeNames carries them (`<n>+<value>`)."""

    OTHER_NAME = 1
    RFC822 = 2
    DNS = 3
    URL = 7
    IP = 8
    REGISTERED_ID = 9
    UPN = 11


_SAN_NAMES: dict[str, SanType] = {
    "email": SanType.RFC822, "rfc822": SanType.RFC822, "dns": SanType.DNS,
    "url": SanType.URL, "uri": SanType.URL, "ip": SanType.IP,
    "registered_id": SanType.REGISTERED_ID, "upn": SanType.UPN,
}

KEY_USAGE_BITS: dict[str, int] = {
    "digital_signature": 0x80, "non_repudiation": 0x40, "key_encipherment": 0x20,
    "data_encipherment": 0x10, "key_agreement": 0x08, "key_cert_sign": 0x04,
    "crl_sign": 0x02, "encipher_only": 0x01, "decipher_only": 0x8000,
}

EKU_NAMES: dict[str, str] = {
    "server_auth": "1.3.6.1.5.5.7.3.1", "client_auth": "1.3.6.1.5.5.7.3.2",
    "code_signing": "1.3.6.1.5.5.7.3.3", "email_protection": "1.3.6.1.5.5.7.3.4",
    "smartcard_logon": "1.3.6.1.4.1.311.20.2.2", "any": "2.5.29.37.0",
}

KEY_PROTECTION_NAMES: dict[str, int] = {
    "tpm": 1, "tpm_required": 1, "tpm_if_present": 2, "software": 3, "hello": 4,
}

HASH_ALGORITHMS = ("SHA-1", "SHA-2", "SHA-3")
VALID_PERIODS = ("Days", "Months", "Years")
KEY_LENGTHS = (1024, 2048, 4096)


class Var(enum.StrEnum):
    """What a profile variable resolves to (the lab's device/user record fields)."""

    DEVICE_ID = "device_id"
    DEVICE_NAME = "device_name"
    AAD_DEVICE_ID = "aad_device_id"
    SERIAL = "serial"
    FQDN = "fqdn"
    MAC = "mac"
    IMEI = "imei"
    UPN = "upn"
    USER_NAME = "user_name"
    EMAIL = "email"
    USER_ID = "user_id"
    SAM = "sam_account_name"
    ON_PREM_DN = "on_prem_dn"
    ON_PREM_SID = "on_prem_sid"


USER_VARS = frozenset({Var.UPN, Var.USER_NAME, Var.EMAIL, Var.USER_ID, Var.SAM, Var.ON_PREM_DN,
                       Var.ON_PREM_SID})

# Intune's variable names (case-insensitive), device and user.
VARIABLES: dict[str, Var] = {
    "deviceid": Var.DEVICE_ID, "devicename": Var.DEVICE_NAME,
    "aad_device_id": Var.AAD_DEVICE_ID, "azureaddeviceid": Var.AAD_DEVICE_ID,
    "serialnumber": Var.SERIAL, "device_serial": Var.SERIAL,
    "fullyqualifieddomainname": Var.FQDN, "wifimacaddress": Var.MAC,
    "imei": Var.IMEI, "imeinumber": Var.IMEI, "device_imei": Var.IMEI, "meid": Var.IMEI,
    "userprincipalname": Var.UPN, "username": Var.USER_NAME, "emailaddress": Var.EMAIL,
    "userid": Var.USER_ID, "onpremisessamaccountname": Var.SAM,
    "onprem_distinguished_name": Var.ON_PREM_DN, "onpremisessecurityidentifier": Var.ON_PREM_SID,
}

_VAR_RE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")


def variables_in(template: str) -> list[str]:
    return _VAR_RE.findall(template)


def resolve_variable(name: str) -> Var:
    try:
        return VARIABLES[name.lower()]
    except KeyError:
        raise ProfileError(f"unknown variable {{{{{name}}}}} (known: "
                           f"{', '.join(sorted(VARIABLES))}, case-insensitive)") from None


def expand(template: str, values: Mapping[Var, str | None]) -> str:
    """Fill `{{Variables}}`; an empty or missing value raises MissingVariableError."""

    def sub(m: re.Match[str]) -> str:
        var = resolve_variable(m.group(1))
        value = values.get(var)
        if not value:
            raise MissingVariableError(m.group(1))
        return value

    return _VAR_RE.sub(sub, template)


@dataclass(frozen=True)
class SanTemplate:
    type: SanType
    value: str


@dataclass(frozen=True)
class ScepProfile:
    id: str  # the policy id (GUID, lower case)
    name: str
    scope: Scope
    subject: str  # name string template
    ekus: tuple[str, ...]
    key_usage: int
    key_length: int = 2048
    sans: tuple[SanTemplate, ...] = ()
    version: int = 1
    key_protection: int = 3
    hash_algorithms: tuple[str, ...] = ("SHA-2",)
    valid_period: str = "Years"
    valid_period_units: int = 1
    renewal_threshold: int = 20  # percent of the lifetime left when renewal is due
    retry_count: int = 3
    retry_delay: int = 1  # minutes
    scep_urls: tuple[str, ...] = ()  # empty: the lab's SCEP URL
    trusted_root: Path | None = None  # None: the lab's SCEP CA certificate
    ca_thumbprint: str | None = None  # override (negative tests); default: SHA-1 of the root
    template_name: str = ""
    container_name: str = ""
    extra_nodes: tuple[tuple[str, str], ...] = ()
    source: Path | None = field(default=None, compare=False)

    @property
    def logical_name(self) -> str:
        return "LogicalName_" + self.id.replace("-", "_")

    def settings(self) -> dict[str, Any]:
        """What the profile delivers (device-independent), for the hash and `lab show`."""
        return {
            "scope": self.scope.value, "version": self.version, "subject": self.subject,
            "sans": [[s.type.value, s.value] for s in self.sans], "ekus": list(self.ekus),
            "key_usage": self.key_usage, "key_length": self.key_length,
            "key_protection": self.key_protection, "hash": list(self.hash_algorithms),
            "valid_period": self.valid_period, "units": self.valid_period_units,
            "retry_count": self.retry_count, "retry_delay": self.retry_delay,
            "scep_urls": list(self.scep_urls), "ca_thumbprint": self.ca_thumbprint,
            "template": self.template_name, "container": self.container_name,
            "extra": [list(p) for p in self.extra_nodes],
        }

    @property
    def hash_value(self) -> int:
        """Signed 32-bit digest of the settings (Intune's `Hash_<n>` may be negative)."""
        canon = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return int.from_bytes(hashlib.sha256(canon.encode()).digest()[:4], "big", signed=True)

    def unique_id(self, account_id: str) -> str:
        return f"ModelName_AC_{account_id}_{self.logical_name}_Hash_{self.hash_value}"

    def request_id(self, account_id: str) -> str:
        return (f"ModelName=AC_{account_id}/{self.logical_name};"
                f"Version={self.version};Hash={self.hash_value}")

    def variables(self) -> set[Var]:
        texts = [self.subject, *(s.value for s in self.sans)]
        return {resolve_variable(v) for t in texts for v in variables_in(t)}


# --- expansion for one device --------------------------------------------------------------

@dataclass(frozen=True)
class ExpandedProfile:
    """The profile as one device receives it (everything but the challenge)."""

    profile: ScepProfile
    unique_id: str
    request_id: str
    subject_rdns: tuple[x500.Rdn, ...]
    sans: tuple[tuple[SanType, str], ...]

    @property
    def subject_text(self) -> str:
        return x500.render(self.subject_rdns)

    @property
    def subject_pairs(self) -> list[tuple[str, str]]:
        return x500.pairs(self.subject_rdns)

    @property
    def san_text(self) -> str:
        return ";".join(f"{int(t)}+{v}" for t, v in self.sans)


def expand_profile(profile: ScepProfile, account_id: str,
                   values: Mapping[Var, str | None]) -> ExpandedProfile:
    """Expand for one device; MissingVariableError when the device lacks a value."""
    template_rdns = x500.parse(profile.subject)
    rdns = tuple(tuple(x500.Attr(a.key, a.oid, expand(a.value, values)) for a in rdn)
                 for rdn in template_rdns)
    sans = tuple((s.type, expand(s.value, values)) for s in profile.sans)
    return ExpandedProfile(profile, profile.unique_id(account_id),
                           profile.request_id(account_id), rdns, sans)


# --- TOML ----------------------------------------------------------------------------------

def load_profile(path: Path) -> ScepProfile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_profile(data, base_dir=path.parent, source=path)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def load_profiles(directory: Path) -> dict[str, ScepProfile]:
    """All `*.toml` profiles of a directory, by id (an id used twice is an error)."""
    out: dict[str, ScepProfile] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.toml")):
        prof = load_profile(path)
        if prof.id in out:
            raise ProfileError(f"{path}: id {prof.id} is also used by {out[prof.id].source}")
        out[prof.id] = prof
    return out


def find_profile(profiles: Mapping[str, ScepProfile], ref: str) -> ScepProfile | None:
    """By id, by name (case-insensitive) or by file stem."""
    if ref.lower() in profiles:
        return profiles[ref.lower()]
    for p in profiles.values():
        if p.name.lower() == ref.lower() or (p.source is not None and p.source.stem == ref):
            return p
    return None


_KNOWN_KEYS = frozenset({
    "id", "name", "scope", "version", "subject", "san", "ekus", "key_usage", "key_length",
    "key_protection", "hash_algorithm", "validity", "renewal_threshold", "retry_count",
    "retry_delay", "scep_urls", "trusted_root", "ca_thumbprint", "template_name",
    "container_name", "extra_nodes",
})


def parse_profile(data: Mapping[str, Any], *, base_dir: Path = Path(),
                  source: Path | None = None) -> ScepProfile:
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise ProfileError(f"unknown key(s): {', '.join(sorted(unknown))}")
    pid = _str(data, "id", required=True)
    try:
        pid = str(uuid.UUID(pid))
    except ValueError:
        raise ProfileError(f"id: {pid!r} is not a GUID (Intune policy ids are GUIDs)") from None
    scope_text = _str(data, "scope", "device")
    try:
        scope = Scope(scope_text.lower())
    except ValueError:
        raise ProfileError(f"scope: {scope_text!r} is not 'device' or 'user'") from None
    subject = _str(data, "subject", required=True)
    try:
        x500.parse(subject)
    except x500.X500Error as exc:
        raise ProfileError(f"subject: {exc}") from None
    profile = ScepProfile(
        id=pid, name=_str(data, "name", source.stem if source else pid), scope=scope,
        subject=subject, sans=_sans(data.get("san", [])), ekus=_ekus(data.get("ekus")),
        key_usage=_key_usage(data.get("key_usage", 160)),
        key_length=_choice_int(data, "key_length", 2048, KEY_LENGTHS),
        version=_int(data, "version", 1, lo=1),
        key_protection=_key_protection(data.get("key_protection", 3)),
        hash_algorithms=_hashes(data.get("hash_algorithm", "SHA-2")),
        valid_period=_validity(data)[0], valid_period_units=_validity(data)[1],
        renewal_threshold=_int(data, "renewal_threshold", 20, lo=1, hi=99),
        retry_count=_int(data, "retry_count", 3, lo=0, hi=30),
        retry_delay=_int(data, "retry_delay", 1, lo=1),
        scep_urls=tuple(_str_list(data, "scep_urls")),
        trusted_root=(base_dir / _str(data, "trusted_root")) if data.get("trusted_root") else None,
        ca_thumbprint=_thumbprint(data.get("ca_thumbprint")),
        template_name=_str(data, "template_name", ""),
        container_name=_str(data, "container_name", ""),
        extra_nodes=_extra(data.get("extra_nodes", {})), source=source)
    used = profile.variables()  # raises on unknown variables
    if scope is Scope.DEVICE and used & USER_VARS:
        names = ", ".join(sorted(v.value for v in used & USER_VARS))
        raise ProfileError(f"a device profile cannot use user variables ({names}); "
                           f"make it scope = \"user\"")
    return profile


def _str(data: Mapping[str, Any], key: str, default: str = "", *, required: bool = False) -> str:
    if key not in data:
        if required:
            raise ProfileError(f"{key}: required")
        return default
    value = data[key]
    if not isinstance(value, str):
        raise ProfileError(f"{key}: must be a string, not {type(value).__name__}")
    return value


def _int(data: Mapping[str, Any], key: str, default: int, *, lo: int | None = None,
         hi: int | None = None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{key}: must be an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProfileError(f"{key}: {value} out of range [{lo}, {hi if hi is not None else '…'}]")
    return value


def _choice_int(data: Mapping[str, Any], key: str, default: int, choices: tuple[int, ...]) -> int:
    value = _int(data, key, default)
    if value not in choices:
        raise ProfileError(f"{key}: {value} is not one of {', '.join(map(str, choices))}")
    return value


def _str_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [v for v in value.split(";") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProfileError(f"{key}: must be a list of strings")
    return value


def _sans(value: object) -> tuple[SanTemplate, ...]:
    if not isinstance(value, list):
        raise ProfileError("san: must be a list of {type, value} tables")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) != {"type", "value"}:
            raise ProfileError(f"san[{i}]: must be a table with exactly 'type' and 'value'")
        t, v = entry["type"], entry["value"]
        if not isinstance(v, str) or not v:
            raise ProfileError(f"san[{i}].value: must be a non-empty string")
        if isinstance(t, int) and not isinstance(t, bool):
            try:
                san_type = SanType(t)
            except ValueError:
                raise ProfileError(f"san[{i}].type: {t} is not a CERT_ALT_NAME number") from None
        elif isinstance(t, str) and t.lower() in _SAN_NAMES:
            san_type = _SAN_NAMES[t.lower()]
        else:
            raise ProfileError(f"san[{i}].type: {t!r} is not one of "
                               f"{', '.join(sorted(_SAN_NAMES))} or a number")
        out.append(SanTemplate(san_type, v))
    return tuple(out)


def _oid(text: str) -> bool:
    parts = text.split(".")
    return len(parts) >= 2 and all(p.isdigit() for p in parts)


def _ekus(value: object) -> tuple[str, ...]:
    if value is None:
        return (EKU_NAMES["client_auth"],)
    if isinstance(value, str):
        value = [v for v in value.split("+") if v]
    if not isinstance(value, list) or not value:
        raise ProfileError("ekus: must be a non-empty list of OIDs or names")
    out = []
    for v in value:
        if not isinstance(v, str):
            raise ProfileError("ekus: must be strings")
        oid = EKU_NAMES.get(v.lower(), v)
        if not _oid(oid):
            raise ProfileError(f"ekus: {v!r} is not an OID or one of {', '.join(EKU_NAMES)}")
        out.append(oid)
    return tuple(out)


def _key_usage(value: object) -> int:
    if isinstance(value, bool):
        raise ProfileError("key_usage: must be a number or a list of names")
    if isinstance(value, int):
        bits = value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        bits = 0
        for name in value:
            if name.lower() not in KEY_USAGE_BITS:
                raise ProfileError(f"key_usage: {name!r} is not one of "
                                   f"{', '.join(KEY_USAGE_BITS)}")
            bits |= KEY_USAGE_BITS[name.lower()]
    else:
        raise ProfileError("key_usage: must be a number or a list of names")
    if not bits & 0xA0:
        raise ProfileError(f"key_usage: {bits} must include digital_signature (0x80) and/or "
                           f"key_encipherment (0x20), as the CSP requires")
    if bits & ~0x80FF:
        raise ProfileError(f"key_usage: {bits} has bits that are not key usages")
    return bits


def _key_protection(value: object) -> int:
    if isinstance(value, str) and value.lower() in KEY_PROTECTION_NAMES:
        return KEY_PROTECTION_NAMES[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4:
        return value
    raise ProfileError(f"key_protection: {value!r} is not 1-4 or one of "
                       f"{', '.join(KEY_PROTECTION_NAMES)}")


def _hashes(value: object) -> tuple[str, ...]:
    items = value.split("+") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ProfileError("hash_algorithm: must be a string or a list")
    out = []
    for item in items:
        match = next((h for h in HASH_ALGORITHMS if isinstance(item, str)
                      and h.lower() == item.strip().lower()), None)
        if match is None:
            raise ProfileError(f"hash_algorithm: {item!r} is not one of "
                               f"{', '.join(HASH_ALGORITHMS)}")
        out.append(match)
    return tuple(out)


def _validity(data: Mapping[str, Any]) -> tuple[str, int]:
    value = data.get("validity", {"period": "Years", "units": 1})
    if not isinstance(value, dict) or set(value) - {"period", "units"}:
        raise ProfileError("validity: must be a table {period, units}")
    period = value.get("period", "Years")
    match = next((p for p in VALID_PERIODS if isinstance(period, str)
                  and p.lower() == period.lower()), None)
    if match is None:
        raise ProfileError(f"validity.period: {period!r} is not one of "
                           f"{', '.join(VALID_PERIODS)}")
    units = value.get("units", 1)
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ProfileError("validity.units: must be a positive integer")
    return match, units


def _thumbprint(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProfileError("ca_thumbprint: must be a string")
    return value.replace(" ", "").upper()


def _extra(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ProfileError("extra_nodes: must be a table of Install node name = value")
    out = []
    for k, v in value.items():
        if not isinstance(v, str | int) or isinstance(v, bool):
            raise ProfileError(f"extra_nodes.{k}: must be a string or an integer")
        out.append((str(k), str(v)))
    return tuple(out)
