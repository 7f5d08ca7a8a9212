"""Background jobs (extractions, mapping fits, bakes): asyncio tasks, polled by id, cancellable.

A job waits for its turn (job_admission.py: places per kind and per model, a bounded queue) before its
work starts. Cancelling cancels the task; work running in a thread (a training loop) stops at its next
progress report, which raises JobCancelled once the job is cancelled. A job's ``on_end`` runs once
however it ends, queued or running, to release what its service reserved and remove what it wrote.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.admin.job_admission import Admission, JobLimits, Ticket

logger = logging.getLogger(__name__)

Work = Callable[[Callable[[float], None]], Awaitable[dict[str, Any]]]
OnEnd = Callable[["Job"], Awaitable[None]]


class JobCancelled(Exception):
    """Raised by a cancelled job's progress callback: the work stops where it reports progress."""


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job '{job_id}' does not exist (or is too old to be kept)")


@dataclass
class Job:
    id: str
    kind: str
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    progress: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    ticket: Ticket | None = field(default=None, repr=False)

    @property
    def queue_position(self) -> int | None:
        """1 for the next queued job to start, 2 for the one after...; None unless queued."""
        return self.ticket.position if self.status == "queued" and self.ticket is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "queue_position": self.queue_position,
            "progress": round(self.progress, 4),
            "error": self.error,
            "result": self.result,
            "created_at": self.created_at,
        }


class JobRegistry:
    def __init__(self, limits: JobLimits | None = None, keep: int = 200) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep
        self.admission = Admission(limits or JobLimits())

    def submit(self, kind: str, work: Work, models: Sequence[str] = (), on_end: OnEnd | None = None) -> Job:
        """Run ``work`` on ``models`` when its turn comes; JobQueueFull (429) when it cannot even wait."""
        ticket = self.admission.enter(kind, models)
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", kind=kind, ticket=ticket)
        self._jobs[job.id] = job
        while len(self._jobs) > self._keep:
            oldest = next(iter(self._jobs.values()))
            if oldest.status in ("queued", "running"):
                break
            self._jobs.popitem(last=False)
        job.task = asyncio.create_task(self._run(job, work, on_end))
        return job

    async def _run(self, job: Job, work: Work, on_end: OnEnd | None) -> None:
        def progress(fraction: float) -> None:
            if job.status == "cancelled":
                raise JobCancelled(job.id)
            job.progress = min(max(fraction, 0.0), 1.0)

        assert job.ticket is not None
        try:
            await job.ticket.admitted.wait()
            if job.status == "cancelled":  # while it waited: it never runs
                return
            job.status = "running"
            job.result = await work(progress)
            job.status, job.progress = "succeeded", 1.0
        except (asyncio.CancelledError, JobCancelled):
            job.status = "cancelled"
        except Exception as exc:  # a failed job reports why; the server goes on
            logger.exception("%s job %s failed", job.kind, job.id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self.admission.leave(job.ticket)
            if on_end is not None:
                await self._end(job, on_end)

    @staticmethod
    async def _end(job: Job, on_end: OnEnd) -> None:
        try:
            await on_end(job)
        except Exception:  # the job's own outcome stands; what its clean-up missed is logged
            logger.exception("cleaning up after %s job %s failed", job.kind, job.id)

    def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job (a finished one is left as it ended)."""
        job = self.get(job_id)
        if job.status == "queued" and job.ticket is not None:
            # Not through Task.cancel: a task cancelled before its first step never runs its body,
            # whose clean-up (on_end) must run however the job ends. Woken, it sees it is cancelled.
            job.status = "cancelled"
            self.admission.leave(job.ticket)
            job.ticket.admitted.set()
        elif job.status == "running":
            job.status = "cancelled"
            if job.task is not None:
                job.task.cancel()
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFound(job_id) from None

    async def close(self) -> None:
        tasks = [job.task for job in self._jobs.values() if job.task is not None and not job.task.done()]
        for job in list(self._jobs.values()):
            self.cancel(job.id)
        # Each cancelled job runs its clean-up (a half-written bake's folder goes) before the engines
        # it used are closed.
        await asyncio.gather(*tasks, return_exceptions=True)
