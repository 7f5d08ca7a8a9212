"""Jobs are bounded (issue 29): places per kind and per model, a queue with positions, 429 past it,
and each job's clean-up however it ends."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
import torch

from server.admin.job_admission import Admission, JobLimits
from server.admin.jobs import Job, JobRegistry
from server.baking.low_priority import JOB_NICE, run_low_priority
from server.serving.errors import JobQueueFull, Overloaded


class Gate:
    """Work that runs until the test opens its gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.started = 0

    async def work(self, _progress: Any) -> dict[str, Any]:
        self.started += 1
        await self.opened.wait()
        return {"done": True}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def statuses(jobs: list[Job]) -> list[tuple[str, int | None]]:
    return [(job.status, job.queue_position) for job in jobs]


async def test_jobs_past_the_places_of_their_kind_queue_with_positions_then_run() -> None:
    jobs, gate = JobRegistry(JobLimits(per_kind=2, per_model=5, max_queued=5)), Gate()
    started = [jobs.submit("bake", gate.work, models=[f"m{i}"]) for i in range(4)]
    await settle()
    assert statuses(started) == [("running", None), ("running", None), ("queued", 1), ("queued", 2)]
    assert started[2].to_dict()["queue_position"] == 1 and gate.started == 2
    other = jobs.submit("extraction", gate.work, models=["m9"])  # another kind has places of its own
    await settle()
    assert other.status == "running"
    gate.opened.set()
    await asyncio.gather(*(job.task for job in (*started, other) if job.task is not None))
    assert [job.status for job in started] == ["succeeded"] * 4


async def test_jobs_on_one_model_wait_for_its_place_and_others_pass_them() -> None:
    jobs, gate = JobRegistry(JobLimits(per_kind=8, per_model=1, max_queued=5)), Gate()
    first = jobs.submit("bake", gate.work, models=["a"])
    fit = jobs.submit("mapping", gate.work, models=["b", "a"])  # a map fit works on both its models
    elsewhere = jobs.submit("extraction", gate.work, models=["c"])
    await settle()
    assert statuses([first, fit, elsewhere]) == [("running", None), ("queued", 1), ("running", None)]
    assert jobs.admission.on_model("a") == 2 and jobs.admission.on_model("c") == 1
    jobs.cancel(first.id)
    await settle()
    assert first.status == "cancelled" and fit.status == "running"
    gate.opened.set()
    await settle()


async def test_past_the_queue_a_job_is_refused_with_retry_after() -> None:
    jobs, gate = JobRegistry(JobLimits(per_kind=1, per_model=1, max_queued=1)), Gate()
    jobs.submit("bake", gate.work, models=["a"])
    waiting = jobs.submit("bake", gate.work, models=["b"])
    with pytest.raises(JobQueueFull) as refused:
        jobs.submit("bake", gate.work, models=["c"])
    assert isinstance(refused.value, Overloaded)  # answered 429 with Retry-After by api/errors.py
    assert refused.value.retry_after_seconds >= 1 and "bake" in str(refused.value)
    jobs.cancel(waiting.id)  # a cancelled queued job frees its queue place at once
    await settle()
    assert waiting.status == "cancelled" and waiting.queue_position is None
    assert jobs.submit("bake", gate.work, models=["c"]).status == "queued"
    gate.opened.set()
    await settle()


async def test_retry_after_follows_the_kinds_recent_durations() -> None:
    admission = Admission(JobLimits(per_kind=1, per_model=1, max_queued=0))
    ticket = admission.enter("bake", ["a"])
    ticket.started_at = (ticket.started_at or 0.0) - 41.5  # as if it ran 41.5 s: rounded up
    admission.leave(ticket)
    assert admission.retry_after("bake") == 42
    admission.enter("bake", ["a"])
    with pytest.raises(JobQueueFull) as refused:
        admission.enter("bake", ["b"])
    assert refused.value.retry_after_seconds == 42


async def test_every_ending_runs_the_jobs_clean_up_once() -> None:
    jobs, gate, ended = JobRegistry(JobLimits(per_kind=1, per_model=1, max_queued=5)), Gate(), []

    async def on_end(job: Job) -> None:
        ended.append((job.id, job.status))

    async def fails(_progress: Any) -> dict[str, Any]:
        raise RuntimeError("no")

    running = jobs.submit("bake", gate.work, models=["a"], on_end=on_end)
    queued = jobs.submit("bake", gate.work, models=["b"], on_end=on_end)
    await settle()
    jobs.cancel(queued.id)
    jobs.cancel(running.id)
    failing = jobs.submit("bake", fails, models=["a"], on_end=on_end)
    await settle()
    expected = [(queued.id, "cancelled"), (running.id, "cancelled"), (failing.id, "failed")]
    assert sorted(ended) == sorted(expected)


async def test_a_map_request_takes_a_turn_among_the_jobs() -> None:
    jobs, gate = JobRegistry(JobLimits(per_kind=4, per_model=1, max_queued=1)), Gate()
    jobs.submit("bake", gate.work, models=["a"])
    admission, entered = jobs.admission, asyncio.Event()

    async def map_request() -> None:
        async with admission.turn("map", ["b", "a"]):
            entered.set()

    waiting = asyncio.create_task(map_request())
    await settle()
    assert not entered.is_set()  # model a is taken by the bake
    with pytest.raises(JobQueueFull):  # and the one queue place by the map request
        async with admission.turn("map", ["a", "c"]):
            pass
    gate.opened.set()
    await asyncio.wait_for(waiting, 5)
    assert entered.is_set() and admission.on_model("a") == 0


async def test_cpu_heavy_job_work_runs_on_a_thread_of_its_own_at_a_low_priority() -> None:
    def where() -> tuple[int, int, int]:
        return (
            threading.get_native_id(),
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
            torch.get_num_threads(),
        )

    threads_before = torch.get_num_threads()
    thread, nice, threads = await run_low_priority(1, where)
    assert thread != threading.get_native_id() and nice == JOB_NICE and threads == 1
    assert torch.get_num_threads() == threads_before  # the caller's threads are as they were
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert await asyncio.to_thread(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())) == own
