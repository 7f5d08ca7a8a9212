"""Background jobs (extractions, mapping fits, bakes): asyncio tasks, polled by id, cancellable.

Cancelling cancels the task; work running in a thread (a training loop) stops at its next progress
report, which raises JobCancelled once the job is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Work = Callable[[Callable[[float], None]], Awaitable[dict[str, Any]]]


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": round(self.progress, 4),
            "error": self.error,
            "result": self.result,
            "created_at": self.created_at,
        }


class JobRegistry:
    def __init__(self, keep: int = 200) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep

    def submit(self, kind: str, work: Work) -> Job:
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", kind=kind)
        self._jobs[job.id] = job
        while len(self._jobs) > self._keep:
            oldest = next(iter(self._jobs.values()))
            if oldest.status in ("queued", "running"):
                break
            self._jobs.popitem(last=False)
        job.task = asyncio.create_task(self._run(job, work))
        return job

    async def _run(self, job: Job, work: Work) -> None:
        def progress(fraction: float) -> None:
            if job.status == "cancelled":
                raise JobCancelled(job.id)
            job.progress = min(max(fraction, 0.0), 1.0)

        job.status = "running"
        try:
            job.result = await work(progress)
        except (asyncio.CancelledError, JobCancelled):
            job.status = "cancelled"
            return
        except Exception as exc:  # a failed job reports why; the server goes on
            logger.exception("%s job %s failed", job.kind, job.id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        job.status, job.progress = "succeeded", 1.0

    def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job (a finished one is left as it ended)."""
        job = self.get(job_id)
        if job.status in ("queued", "running"):
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
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
