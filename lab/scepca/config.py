"""Configuration of the lab SCEP CA: mode, capabilities, policy hooks, pending and validity.

A frozen dataclass, built by the CLI (`python -m lab.scepca serve …`) or by Python callers
(`lab.scepca.testing.LabScepCA`). The policy hooks (`verifier`, `notifier`) are plain callables
so the lab MDM server can plug its dynamic-challenge validation and its CRS upload in, the way
an NDES policy module (INDESPolicy::VerifyRequest / ::Notify) plugs into NDES.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.scepca.notify import CrsRecord
    from lab.scepca.policy import ChallengeVerifier


class Mode(enum.StrEnum):
    """`normal`: one CA certificate does everything (like micromdm scepserver).
    `ndes`: like Microsoft NDES — separate RA signing and encryption certificates, the
    `/certsrv/mscep/mscep.dll` path, 403 on the bare URL, 3DES/SHA-1 capabilities."""

    NORMAL = "normal"
    NDES = "ndes"


# Paths clients use (RFC 8894 §4.1: CGI-PATH + "/pkiclient.exe" is customary; Windows appends
# it to the ServerURL, which yields "mscep.dll//pkiclient.exe" when the URL ends in "/").
NORMAL_PATH = "/scep"
NDES_PATH = "/certsrv/mscep/mscep.dll"

# GetCACaps answers (RFC 8894 §3.5.2). NDES on Server 2012 R2 offers only 3DES and SHA-1 for
# the message layer (what the Windows client then has to use); the lab's normal mode offers
# everything this CA implements.
NORMAL_CAPS: tuple[str, ...] = ("AES", "DES3", "POSTPKIOperation", "Renewal", "SHA-1",
                                "SHA-256", "SHA-512", "SCEPStandard")
NDES_CAPS: tuple[str, ...] = ("POSTPKIOperation", "Renewal", "SHA-1", "DES3")


class PendingKind(enum.StrEnum):
    NONE = "none"            # issue at once
    MANUAL = "manual"        # PENDING until `python -m lab.scepca approve <txid>`
    AFTER_SECONDS = "after"  # PENDING, approved automatically N seconds after the request
    AFTER_POLLS = "polls"    # PENDING, approved at the N-th CertPoll


@dataclass(frozen=True)
class PendingPolicy:
    kind: PendingKind = PendingKind.NONE
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> PendingPolicy:
        """`none`, `manual`, `after:SECONDS`, `polls:N`."""
        name, _, arg = text.strip().partition(":")
        try:
            kind = PendingKind(name.lower())
        except ValueError:
            raise ValueError(f"unknown pending policy {text!r} "
                             "(none, manual, after:SECONDS, polls:N)") from None
        if kind in (PendingKind.AFTER_SECONDS, PendingKind.AFTER_POLLS):
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"{kind.value} needs a number: {text!r}") from None
            if value < 0 or (kind is PendingKind.AFTER_POLLS and value != int(value)):
                raise ValueError(f"invalid {kind.value} value in {text!r}")
            return cls(kind, value)
        if arg:
            raise ValueError(f"{kind.value} takes no argument: {text!r}")
        return cls(kind)

    def __str__(self) -> str:
        if self.kind in (PendingKind.AFTER_SECONDS, PendingKind.AFTER_POLLS):
            return f"{self.kind.value}:{self.value:g}"
        return self.kind.value


@dataclass(frozen=True)
class Template:
    """What an issued certificate gets when the CSR does not ask (a CA certificate template)."""

    ekus: tuple[str, ...] = ("1.3.6.1.5.5.7.3.2",)  # clientAuth
    key_usage: int = 0xA0  # digitalSignature | keyEncipherment (CERT_*_KEY_USAGE bits)
    validity_days: int | None = None  # None: CAConfig.validity_days


DEFAULT_TEMPLATES: Mapping[str, Template] = {"default": Template()}

Notifier = Callable[["CrsRecord"], None]


@dataclass(frozen=True)
class CAConfig:
    mode: Mode = Mode.NORMAL
    caps: tuple[str, ...] | None = None  # None: the mode's default
    # Refuse (badAlg) requests whose digest or content cipher GetCACaps did not offer. On by
    # default for NDES mode (clients must honour its 3DES/SHA-1 list), off in normal mode
    # (micromdm's scepclient encrypts with single DES whatever the CA says).
    enforce_caps: bool | None = None
    verifier: ChallengeVerifier | None = None  # None: no challenge check at all
    pending: PendingPolicy = PendingPolicy()
    validity_days: int = 365
    max_validity_days: int = 825  # cap for the CSR's validity request
    honor_validity_request: bool = True
    templates: Mapping[str, Template] = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    default_template: str = "default"
    allow_renewal: bool = True
    renewal_requires_same_name: bool = True  # NDES: same subject or SAN as the signing cert
    max_clock_skew: float = 86400.0  # badTime beyond this signingTime distance (seconds)
    clock_offset: float = 0.0  # the CA's clock runs this many seconds ahead (lab fault)
    min_key_size: int = 1024
    notifier: Notifier | None = None
    crs_dir: str | None = None  # also drop CRS XML files here (Succeed/, Failed/)
    max_body: int = 1 << 20

    @property
    def effective_caps(self) -> tuple[str, ...]:
        if self.caps is not None:
            return self.caps
        return NDES_CAPS if self.mode is Mode.NDES else NORMAL_CAPS

    @property
    def effective_enforce_caps(self) -> bool:
        if self.enforce_caps is not None:
            return self.enforce_caps
        return self.mode is Mode.NDES

    @property
    def path(self) -> str:
        return NDES_PATH if self.mode is Mode.NDES else NORMAL_PATH

    def template(self, name: str | None) -> tuple[str, Template]:
        if name and name in self.templates:
            return name, self.templates[name]
        return self.default_template, self.templates[self.default_template]
