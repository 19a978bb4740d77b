"""One device's scheduled work: OMA-DM syncs on the DMClient poll schedule and the dmcertinst
tasks, driven by a shared apscheduler (one scheduler runs a whole fleet).

Everything the runtime needs to resume lives in the registry store: task records (attempts
made, next run), the poll count, the Install nodes. `start()` re-arms exactly what is pending,
so a restart (or a SIGKILL) loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.device import DeviceContext
from agent.enrollment import Enrollment, EnrollmentStore
from agent.errors import DmAgentError
from agent.taskstore import TaskRecord, TaskStore
from service.pollplan import next_poll_minutes

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from agent.certinst import AttemptOutcome

log = logging.getLogger("dmagent.service")

POLL_COUNT = "ScheduledPollsDone"  # under the enrollment's ConnInfo key


@dataclass
class SyncResult:
    enrollment_id: str
    ok: bool
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class DeviceRuntime:
    def __init__(self, ctx: DeviceContext, scheduler: AsyncIOScheduler, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.scheduler = scheduler
        self.clock = clock
        self.name = ctx.device.device_id
        self._sync_lock = asyncio.Lock()
        self._sync_again = False
        self._last_results: list[SyncResult] = []
        self.syncs_done = 0
        self.outcomes: list[AttemptOutcome] = []

    # --- start-up ----------------------------------------------------------------------------

    def start(self) -> None:
        url = self.ctx.config.server.url
        if url:  # the configured server is this device's MDM (enrolled on first start)
            EnrollmentStore(self.ctx.registry).ensure(url, upn=self.ctx.device.user_upn)
        self.rearm_tasks()
        if self.ctx.config.sync.on_start:
            self.request_sync("start")
        else:
            for enrollment in EnrollmentStore(self.ctx.registry).list():
                self._schedule_poll(enrollment)

    def rearm_tasks(self) -> None:
        """Arm a job for every task record at its NextRun (now when overdue)."""
        now = self.clock()
        for task in TaskStore(self.ctx.registry).list():
            when = max(now, task.next_run_ms / 1000)
            self.scheduler.add_job(
                self._run_task, "date", run_date=_at(when), args=[task.enrollment_id, task.name],
                id=self._job_id("task", task.enrollment_id, task.name), replace_existing=True,
                misfire_grace_time=None, coalesce=True)

    # --- enrollment tasks --------------------------------------------------------------------

    async def run_task_now(self, enrollment_id: str, name: str) -> AttemptOutcome | None:
        """`dmagent tasks run`: one attempt now (the node lock keeps it from overlapping)."""
        return await self._run_task(enrollment_id, name)

    async def _run_task(self, enrollment_id: str, name: str) -> AttemptOutcome | None:
        from agent.certinst import Certinst, CertinstRequest

        task = TaskStore(self.ctx.registry).find(enrollment_id, name)
        if task is None:
            return None  # deleted since it was armed (the node was deleted, or it finished)
        req = CertinstRequest(task.install_key, task.hive, task.unique_id)
        try:
            outcome = await Certinst(self.ctx, clock=self.clock).run(req)
        except DmAgentError as exc:
            log.warning("%s: task %s: %s", self.name, name, exc.message)
            self._rearm_one(task)
            return None
        self.outcomes.append(outcome)
        if not outcome.final:
            self._rearm_one(task)
        elif self.ctx.config.sync.after_enrollment:
            self.request_sync("enrollment finished")
        return outcome

    def _rearm_one(self, task: TaskRecord) -> None:
        current = TaskStore(self.ctx.registry).find(task.enrollment_id, task.name)
        if current is None:
            return
        when = max(self.clock(), current.next_run_ms / 1000)
        self.scheduler.add_job(
            self._run_task, "date", run_date=_at(when), args=[task.enrollment_id, task.name],
            id=self._job_id("task", task.enrollment_id, task.name), replace_existing=True,
            misfire_grace_time=None, coalesce=True)

    # --- syncs -------------------------------------------------------------------------------

    def request_sync(self, reason: str) -> asyncio.Task[list[SyncResult]]:
        """Start a sync now (coalesced: a request during a sync runs one more after it)."""
        log.info("%s: sync requested (%s)", self.name, reason)
        return asyncio.get_running_loop().create_task(self.sync(scheduled=False))

    async def sync(self, *, scheduled: bool = False) -> list[SyncResult]:
        if self._sync_lock.locked():
            self._sync_again = True
            async with self._sync_lock:  # wait for the running sync and the one after it
                pass
            return self._last_results  # the run that covered this request
        async with self._sync_lock:
            results = await self._sync_all(scheduled)
            while self._sync_again:
                self._sync_again = False
                results = await self._sync_all(False)
            self._last_results = results
        return results

    async def _sync_all(self, scheduled: bool) -> list[SyncResult]:
        enrollments = EnrollmentStore(self.ctx.registry).list()
        results = [await self._sync_one(e, scheduled) for e in enrollments]
        self.rearm_tasks()  # an Exec Enroll in this session created tasks
        for enrollment in enrollments:
            self._schedule_poll(enrollment)
        self.syncs_done += 1
        return results

    async def _sync_one(self, enrollment: Enrollment, scheduled: bool) -> SyncResult:
        from agent.omadm import run_session, tree_executor
        from agent.transport import HttpTransport, TransportOptions

        store = EnrollmentStore(self.ctx.registry)
        if scheduled:
            self._count_poll(enrollment)
        try:
            transport = HttpTransport(TransportOptions.from_config(self.ctx.config.server))
            async with transport:
                summary = await run_session(self.ctx, enrollment,
                                            tree_executor(self.ctx, enrollment), transport)
        except DmAgentError as exc:
            store.record_session(enrollment, False, self.clock(), exc.message)
            log.warning("%s: sync with %s failed: %s", self.name, enrollment.server_url,
                        exc.message)
            return SyncResult(enrollment.enrollment_id, False, error=exc.message)
        ok = summary.failure is None
        detail = "ok" if summary.failure is None else summary.failure.message
        store.record_session(enrollment, ok, self.clock(), detail)
        log.info("%s: sync with %s %s", self.name, enrollment.server_url,
                 "completed" if ok else f"failed: {detail}")
        return SyncResult(enrollment.enrollment_id, ok, summary.as_dict(), "" if ok else detail)

    def _count_poll(self, enrollment: Enrollment) -> None:
        from agent.enrollment import conn_info_key

        key = conn_info_key(enrollment)
        done = self.ctx.registry.query(key, POLL_COUNT)
        self.ctx.registry.set_dword(key, POLL_COUNT, (done if isinstance(done, int) else 0) + 1)

    def _schedule_poll(self, enrollment: Enrollment) -> None:
        from agent.csp.dmclient import read_poll_schedule
        from agent.enrollment import conn_info_key

        schedule = read_poll_schedule(self.ctx.registry, enrollment)
        done = self.ctx.registry.query(conn_info_key(enrollment), POLL_COUNT)
        minutes = next_poll_minutes(schedule.sets, done if isinstance(done, int) else 0)
        job_id = self._job_id("poll", enrollment.enrollment_id)
        if minutes is None:
            if self.scheduler.get_job(job_id):
                self.scheduler.remove_job(job_id)
            return
        when = self.clock() + minutes * self.ctx.config.sync.poll_minute_seconds
        self.scheduler.add_job(self._scheduled_sync, "date", run_date=_at(when), id=job_id,
                               replace_existing=True, misfire_grace_time=None, coalesce=True)

    async def _scheduled_sync(self) -> None:
        await self.sync(scheduled=True)

    def _job_id(self, *parts: str) -> str:
        return ":".join((self.name, *parts))


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
