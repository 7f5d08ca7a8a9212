"""CPU-heavy job work beside serving: on a thread of its own, at a low CPU priority, on a few torch
threads, so that the engines answering chat keep most of the cores they need and the job takes what
is left. Low, not the lowest: at nice 19, a bake on a server whose 2 cores chat kept busy got 3% of
a core and had not finished its training after 15 minutes.

On Linux a thread's nice value is its own (``setpriority`` on its thread id), and under OpenMP
torch's thread count is a setting of each OS thread (checked: a worker thread on 1 thread left the
event loop's threads at 2), so neither touches the engines' threads. The thread is made for the work
and ends with it, so nothing else ever runs at its priority.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Linux's scheduler weighs a nice-10 thread 110 against a nice-0 thread's 1024: about a tenth of a
# core that chat wants too, all of an idle one.
JOB_NICE = 10


def _lower_this_thread(threads: int) -> None:
    import torch

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), JOB_NICE)
    except (OSError, AttributeError):  # not Linux: a thread id is no process id there
        logger.debug("cannot lower the priority of a job's thread here")
    if "OpenMP" in torch.__config__.parallel_info():  # else one process-wide pool: leave it be
        torch.set_num_threads(max(1, min(threads, torch.get_num_threads())))


def _lowered(threads: int, call: Callable[..., T], args: tuple[Any, ...]) -> T:
    _lower_this_thread(threads)
    return call(*args)


async def run_low_priority(threads: int, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` on a new thread at nice ``JOB_NICE``, on at most ``threads`` torch threads.

    If the caller is cancelled, the thread runs on until ``call`` returns (work that reports progress
    to a cancelled job stops at its next report); the event loop never waits for it."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-work")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, _lowered, threads, call, args)
    finally:
        pool.shutdown(wait=False)
