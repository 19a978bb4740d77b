"""DMClient CSP (the parts the agent uses): `./Vendor/MSFT/DMClient` (device scope only).

- `Provider/<ProviderID>/Poll/*`: the sync schedule (DMClient CSP reference, "Poll"): three
  sets of (interval in minutes, number of polls); an interval of 0 disables its set and a
  count of 0 with a non-zero interval repeats that set forever; PollOnLogin /
  AllUsersPollOnFirstLogin (bool). Persisted as DWORDs under
  `HKLM\\SOFTWARE\\Microsoft\\Enrollments\\<EnrollmentId>\\DMClient\\<ProviderID>\\Poll`.
  A value never set reads back as its default — the defaults are the schedule the MS-MDE2
  provisioning document of a typical enrollment sets (15 min × 10, 60 min × 16, then daily).
- `Provider/<ProviderID>/Unenroll` and the legacy `DMClient/Unenroll` (Exec; the Data naming
  the provider is ignored, as on Windows since Threshold): mark the enrollment for removal
  (`UnenrollRequested`, `UnenrollRequestTime` under the enrollment key); the session ends the
  enrollment and tells the server (Alert 1226) afterwards.

Only the enrollment's own ProviderID exists under Provider; another name is 404.
`read_poll_schedule` is what the scheduler reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from agent.dmtree.csp import (
    ADG,
    ADGR,
    CSP,
    ItemValue,
    NodeSpec,
    NodeValue,
    Op,
    Resolved,
    Value,
    interior,
    leaf,
)
from agent.dmtree.errors import DMStatusError, bad_value, not_found
from agent.enrollment import Enrollment
from agent.registry import Registry, RegType
from agent.syncml.messages import Format, StatusCode

POLL_DEFAULTS: Final[dict[str, int | bool]] = {
    "IntervalForFirstSetOfRetries": 15,
    "NumberOfFirstRetries": 10,
    "IntervalForSecondSetOfRetries": 60,
    "NumberOfSecondRetries": 16,
    "IntervalForRemainingScheduledRetries": 1440,
    "NumberOfRemainingScheduledRetries": 0,
    "PollOnLogin": False,
    "AllUsersPollOnFirstLogin": False,
}
UNENROLL_FLAG: Final = "UnenrollRequested"
UNENROLL_TIME: Final = "UnenrollRequestTime"

SCHEMA: Final = interior(
    "DMClient", Op.GET,
    interior("Provider", Op.GET,
             interior("{ProviderID}", ADG,
                      interior("Poll", ADG, *(
                          leaf(name, Format.BOOL if isinstance(default, bool) else Format.INT,
                               ADGR) for name, default in POLL_DEFAULTS.items())),
                      leaf("Unenroll", Format.NULL, Op.EXEC | Op.GET))),
    leaf("Unenroll", Format.NULL, Op.EXEC | Op.GET))


@dataclass(frozen=True)
class PollSchedule:
    first: tuple[int, int]  # (interval minutes, count)
    second: tuple[int, int]
    remaining: tuple[int, int]
    poll_on_login: bool
    all_users_poll_on_first_login: bool

    @property
    def sets(self) -> tuple[tuple[int, int], ...]:
        return self.first, self.second, self.remaining


def poll_key(enrollment: Enrollment) -> str:
    return f"{enrollment.key}\\DMClient\\{enrollment.provider_id}\\Poll"


def read_poll_schedule(registry: Registry, enrollment: Enrollment) -> PollSchedule:
    """The enrollment's poll schedule, defaults filled in for values never set."""
    key = poll_key(enrollment)

    def num(name: str) -> int:
        value = registry.query(key, name)
        return value if isinstance(value, int) else int(POLL_DEFAULTS[name])

    return PollSchedule(
        first=(num("IntervalForFirstSetOfRetries"), num("NumberOfFirstRetries")),
        second=(num("IntervalForSecondSetOfRetries"), num("NumberOfSecondRetries")),
        remaining=(num("IntervalForRemainingScheduledRetries"),
                   num("NumberOfRemainingScheduledRetries")),
        poll_on_login=bool(num("PollOnLogin")),
        all_users_poll_on_first_login=bool(num("AllUsersPollOnFirstLogin")))


def unenroll_requested(registry: Registry, enrollment: Enrollment) -> bool:
    return bool(registry.query(enrollment.key, UNENROLL_FLAG))


class DMClientCSP(CSP):
    schema: NodeSpec = SCHEMA

    def __init__(self, registry: Registry, enrollment: Enrollment | None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.enrollment = enrollment
        self.clock = clock

    def resolve(self, path: tuple[str, ...]) -> Resolved:
        r = super().resolve(path)
        if "ProviderID" in r.vars and (
                self.enrollment is None or
                r.vars["ProviderID"].casefold() != self.enrollment.provider_id.casefold()):
            raise not_found(f"DMClient/Provider/{r.vars['ProviderID']} (not this device's "
                            "MDM provider)")
        return r

    def get(self, path: tuple[str, ...]) -> NodeValue:
        r = self.resolve(path)
        if r.spec.name in POLL_DEFAULTS:
            return self.read(r)  # a value never set reads back as its default
        return super().get(path)

    def exists(self, r: Resolved) -> bool:
        if r.spec.name in POLL_DEFAULTS:
            assert self.enrollment is not None  # resolve() refused any other ProviderID
            return self.registry.query(poll_key(self.enrollment), r.spec.name) is not None
        return True  # interior nodes of the enrollment and Unenroll are permanent

    def children(self, r: Resolved) -> list[str]:
        if r.pattern() == ("Provider",):
            return [self.enrollment.provider_id] if self.enrollment else []
        if r.spec.name == "Poll":
            return list(POLL_DEFAULTS)  # every value reads back, set or default
        return super().children(r)

    def read(self, r: Resolved) -> NodeValue:
        if r.spec.name == "Unenroll":
            return NodeValue(Format.NULL, "")
        assert self.enrollment is not None  # resolve() refused any other ProviderID
        value = self.registry.query(poll_key(self.enrollment), r.spec.name)
        default = POLL_DEFAULTS[r.spec.name]
        number = value if isinstance(value, int) else int(default)
        if r.spec.format == Format.BOOL:
            return NodeValue(Format.BOOL, "true" if number else "false")
        return NodeValue(Format.INT, str(number))

    def write(self, r: Resolved, value: Value, item: ItemValue) -> None:
        assert self.enrollment is not None
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise bad_value(self.describe(r), f"{value} is negative")
        self.registry.set_dword(poll_key(self.enrollment), r.spec.name, int(bool(value))
                                if isinstance(value, bool) else int(value or 0))

    def create(self, r: Resolved) -> None:
        assert self.enrollment is not None
        self.registry.create_key(poll_key(self.enrollment))

    def remove(self, r: Resolved) -> None:
        assert self.enrollment is not None
        key = poll_key(self.enrollment)
        if r.spec.name == "Poll":
            self.registry.delete_key(key)
        elif r.spec.is_interior:
            raise DMStatusError(StatusCode.COMMAND_NOT_ALLOWED,
                                "the provider node of the enrollment cannot be deleted; "
                                "use Exec Unenroll")
        else:
            self.registry.delete_value(key, r.spec.name)

    def execute(self, r: Resolved, item: ItemValue) -> None:
        if self.enrollment is None:
            raise DMStatusError(StatusCode.COMMAND_FAILED, "no MDM enrollment to unenroll")
        self.registry.set_dword(self.enrollment.key, UNENROLL_FLAG, 1)
        self.registry.set_value(self.enrollment.key, UNENROLL_TIME, RegType.REG_QWORD,
                                int(self.clock() * 1000))
