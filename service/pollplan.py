"""When the next scheduled sync happens: the DMClient Poll schedule, as Windows applies it.

Windows creates three sync schedules at enrollment: the first set (IntervalForFirstSetOfRetries
minutes, NumberOfFirstRetries times), then the second set, then the remaining scheduled
retries. Per the MS-MDM poll rules, an interval of 0 disables its set and a count of 0 with a
non-zero interval repeats that set forever. Pure function: the caller counts the polls made.
"""

from __future__ import annotations

from collections.abc import Sequence


def next_poll_minutes(sets: Sequence[tuple[int, int]], polls_done: int) -> int | None:
    """Minutes until the next scheduled sync after `polls_done` scheduled syncs, or None when
    the schedule is exhausted. `sets` = [(interval, count), ...] in order."""
    remaining = polls_done
    for interval, count in sets:
        if interval <= 0:
            continue
        if count <= 0:
            return interval
        if remaining < count:
            return interval
        remaining -= count
    return None
