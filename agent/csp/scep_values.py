"""The `ClientCertificateInstall/SCEP/<UniqueID>/Install/*` nodes: formats, validation, defaults.

One table drives the CSP (what each node accepts), the registry layout (int nodes are
REG_DWORD, chr nodes REG_SZ, the Challenge a sealed REG_BINARY) and `read_install`, which the
enrollment job uses to read a node back with the CSP defaults applied. Node semantics from the
ClientCertificateInstall CSP reference (learn.microsoft.com, "ClientCertificateInstall CSP").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from agent.dmtree.csp import Value
from agent.dmtree.errors import bad_value
from agent.registry import Registry, fold
from agent.sealing import Sealer
from agent.syncml.messages import Format

CHALLENGE: Final = "Challenge"
KEY_PROTECTION_DEFAULT: Final = 3  # software KSP
RETRY_DELAY_DEFAULT: Final = 5  # minutes
RETRY_COUNT_DEFAULT: Final = 3
RETRY_COUNT_MAX: Final = 30  # "If the value is larger than 30, the device will use 30."
KEY_LENGTH_DEFAULT: Final = 2048
KEY_LENGTHS: Final = (1024, 2048, 4096)
HASH_FAMILIES: Final = ("SHA-1", "SHA-2", "SHA-3")
VALID_PERIODS: Final = ("Days", "Months", "Years")
# CERT_ALT_NAME_* numbers accepted in SubjectAlternativeNames (`<format>+<value>;...`).
SAN_TYPES: Final = {1: "other name (UPN)", 2: "RFC822 name", 3: "DNS name", 7: "URL",
                    8: "IP address", 9: "registered ID", 11: "UPN"}
KEY_USAGE_REQUIRED_BITS: Final = 0x80 | 0x20  # digitalSignature, keyEncipherment

_OID = re.compile(r"[0-2](\.[0-9]+)+")
_HEX40 = re.compile(r"[0-9A-Fa-f]{40}")

Validator = Callable[[str, Value], None]


def _server_url(node: str, value: Value) -> None:
    urls = [u.strip() for u in str(value).split(";") if u.strip()]
    if not urls:
        raise bad_value(node, "no server URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise bad_value(node, f"{url!r} is not an http(s) URL")


def _not_empty(node: str, value: Value) -> None:
    if not str(value):
        raise bad_value(node, "empty")


def _eku(node: str, value: Value) -> None:
    for oid in filter(None, str(value).split("+")):
        if not _OID.fullmatch(oid.strip()):
            raise bad_value(node, f"{oid!r} is not an OID")


def _key_usage(node: str, value: Value) -> None:
    assert isinstance(value, int)
    if not 0 < value <= 0xFFFF or not value & KEY_USAGE_REQUIRED_BITS:
        raise bad_value(node, f"{value} must hold digitalSignature (0x80) and/or "
                              "keyEncipherment (0x20)")


def _subject(node: str, value: Value) -> None:
    text = str(value)
    if "\x00" in text or (text.strip() and "=" not in text):
        raise bad_value(node, f"{text!r} is not an X.500 name (e.g. CN=device)")


def _key_protection(node: str, value: Value) -> None:
    if value not in (1, 2, 3, 4):
        raise bad_value(node, f"{value} is not 1 (TPM), 2 (TPM if present), 3 (software) "
                              "or 4 (Windows Hello)")


def _retry_delay(node: str, value: Value) -> None:
    # The docs give 1 as the minimum without a device-side adjustment (unlike RetryCount):
    # a smaller value is refused so the server learns about it.
    assert isinstance(value, int)
    if value < 1:
        raise bad_value(node, f"{value} minutes: the minimum is 1")


def _non_negative(node: str, value: Value) -> None:
    assert isinstance(value, int)
    if value < 0:
        raise bad_value(node, f"{value} is negative")


def _key_length(node: str, value: Value) -> None:
    if value not in KEY_LENGTHS:
        raise bad_value(node, f"{value} is not one of 1024, 2048, 4096")


def _hash_algorithm(node: str, value: Value) -> None:
    families = [f.strip() for f in str(value).split("+")]
    for family in families:
        if family.upper() not in HASH_FAMILIES:
            raise bad_value(node, f"{family!r} is not SHA-1, SHA-2 or SHA-3")


def _thumbprint(node: str, value: Value) -> None:
    cleaned = str(value).replace(" ", "").replace(":", "")
    if not _HEX40.fullmatch(cleaned):
        raise bad_value(node, f"{value!r} is not a SHA-1 thumbprint (40 hex digits)")


def _sans(node: str, value: Value) -> None:
    for entry in filter(None, (e.strip() for e in str(value).split(";"))):
        kind, sep, name = entry.partition("+")
        if not sep or not kind.strip().isdigit() or int(kind) not in SAN_TYPES:
            raise bad_value(node, f"{entry!r} is not <type>+<name> with type one of "
                                  f"{', '.join(map(str, SAN_TYPES))}")
        if not name:
            raise bad_value(node, f"{entry!r} has an empty name")
        if int(kind) == 8:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                raise bad_value(node, f"{name!r} is not an IP address") from None
        if int(kind) == 2 and "@" not in name:
            raise bad_value(node, f"{name!r} is not an e-mail address")


def _valid_period(node: str, value: Value) -> None:
    if str(value).capitalize() not in VALID_PERIODS:
        raise bad_value(node, f"{value!r} is not Days, Months or Years")


def _any(node: str, value: Value) -> None:
    if "\x00" in str(value):
        raise bad_value(node, "contains NUL")


@dataclass(frozen=True)
class InstallNode:
    name: str
    format: str
    validate: Validator


INSTALL_NODES: Final = tuple(InstallNode(*n) for n in (
    ("ServerURL", Format.CHR, _server_url),
    (CHALLENGE, Format.CHR, _not_empty),
    ("EKUMapping", Format.CHR, _eku),
    ("KeyUsage", Format.INT, _key_usage),
    ("SubjectName", Format.CHR, _subject),
    ("KeyProtection", Format.INT, _key_protection),
    ("RetryDelay", Format.INT, _retry_delay),
    ("RetryCount", Format.INT, _non_negative),
    ("TemplateName", Format.CHR, _any),
    ("KeyLength", Format.INT, _key_length),
    ("HashAlgorithm", Format.CHR, _hash_algorithm),
    ("CAThumbprint", Format.CHR, _thumbprint),
    ("SubjectAlternativeNames", Format.CHR, _sans),
    ("ValidPeriod", Format.CHR, _valid_period),
    ("ValidPeriodUnits", Format.INT, _non_negative),
    ("ContainerName", Format.CHR, _any),
    ("CustomTextToShowInPrompt", Format.CHR, _any),
    ("AADKeyIdentifierList", Format.CHR, _any),
))
INSTALL_BY_NAME: Final = {n.name.casefold(): n for n in INSTALL_NODES}


def challenge_purpose(registry: Registry, install_key: str) -> str:
    """The sealing purpose (AES-GCM associated data) of an Install key's Challenge value: its
    canonical registry path, case-folded so HKCU/HKU and any spelling of the key agree."""
    return fold(f"{registry.normalize(install_key)}\\{CHALLENGE}")


@dataclass(frozen=True)
class ScepInstall:
    """An Install node as the enrollment job uses it: CSP defaults applied, Challenge unsealed."""

    server_urls: tuple[str, ...]
    challenge: str | None
    eku_mapping: tuple[str, ...]
    key_usage: int | None
    subject_name: str
    key_protection: int
    retry_delay: int
    retry_count: int  # effective: capped at 30
    template_name: str
    key_length: int
    hash_algorithms: tuple[str, ...]
    ca_thumbprint: str
    subject_alternative_names: tuple[tuple[int, str], ...]
    valid_period: str
    valid_period_units: int
    container_name: str
    custom_text: str
    aad_key_identifiers: tuple[str, ...]


def read_install(registry: Registry, sealer: Sealer, install_key: str) -> ScepInstall:
    """Read an Install key (raises NotFoundError when it does not exist)."""
    values = {v.name.casefold(): v.data for v in registry.values(install_key)}

    def sz(name: str) -> str:
        value = values.get(name.casefold())
        return value if isinstance(value, str) else ""

    def num(name: str) -> int | None:
        value = values.get(name.casefold())
        return value if isinstance(value, int) else None

    def split(text: str, sep: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in text.split(sep) if p.strip())

    blob = values.get(CHALLENGE.casefold())
    challenge = None
    if isinstance(blob, bytes):
        challenge = sealer.unseal(blob, challenge_purpose(registry, install_key)).decode()
    sans = tuple((int(k), v) for k, _, v in (e.partition("+") for e in
                                              split(sz("SubjectAlternativeNames"), ";")))
    retry_count = num("RetryCount")
    return ScepInstall(
        server_urls=split(sz("ServerURL"), ";"), challenge=challenge,
        eku_mapping=split(sz("EKUMapping"), "+"), key_usage=num("KeyUsage"),
        subject_name=sz("SubjectName"),
        key_protection=num("KeyProtection") or KEY_PROTECTION_DEFAULT,
        retry_delay=num("RetryDelay") or RETRY_DELAY_DEFAULT,
        retry_count=min(RETRY_COUNT_DEFAULT if retry_count is None else retry_count,
                        RETRY_COUNT_MAX),
        template_name=sz("TemplateName"), key_length=num("KeyLength") or KEY_LENGTH_DEFAULT,
        hash_algorithms=split(sz("HashAlgorithm"), "+") or ("SHA-2",),
        ca_thumbprint=sz("CAThumbprint").replace(" ", "").replace(":", "").upper(),
        subject_alternative_names=sans, valid_period=sz("ValidPeriod").capitalize() or "Days",
        valid_period_units=num("ValidPeriodUnits") or 0, container_name=sz("ContainerName"),
        custom_text=sz("CustomTextToShowInPrompt"),
        aad_key_identifiers=split(sz("AADKeyIdentifierList"), ";"))
