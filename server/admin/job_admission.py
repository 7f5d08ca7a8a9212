"""Who of the heavy admin work runs now, who waits, and who is turned away.

Jobs (extractions, mapping fits, bakes) and synchronous map requests load the models that serve
chat: unbounded, 6 bakes and 19 extractions made a 16-token chat take 18 s. Each piece of work takes
a ticket naming its kind and the models it works on; it runs while fewer than ``per_kind`` of its
kind and fewer than ``per_model`` on each of its models run, else it waits in one queue (first come,
first served among those that fit), and past ``max_queued`` waiting it is refused (429 with
Retry-After, an estimate from the kind's recent durations).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from server.serving.errors import JobQueueFull

DEFAULT_RETRY_AFTER_SECONDS = 10  # before any work of the kind has finished to time
MAX_RETRY_AFTER_SECONDS = 600
RECENT_DURATIONS = 20  # per kind, for the Retry-After estimate


@dataclass(frozen=True)
class JobLimits:
    per_kind: int = 2  # running at once per kind
    per_model: int = 1  # running at once per model, all kinds together
    max_queued: int = 16  # waiting at once, all kinds together


@dataclass(eq=False)
class Ticket:
    kind: str
    models: tuple[str, ...]
    position: int | None = None  # 1-based place in the queue while waiting; None once running
    started_at: float | None = None
    admitted: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class Admission:
    def __init__(self, limits: JobLimits) -> None:
        self._limits = limits
        self._queue: list[Ticket] = []
        self._running: list[Ticket] = []
        self._durations: dict[str, deque[float]] = {}

    @property
    def limits(self) -> JobLimits:
        return self._limits

    def enter(self, kind: str, models: Sequence[str]) -> Ticket:
        """A ticket that runs now (``admitted`` is set) or waits in the queue; JobQueueFull when it
        would wait and the queue is full."""
        ticket = Ticket(kind, tuple(dict.fromkeys(models)))
        if not self._fits(ticket) and len(self._queue) >= self._limits.max_queued:
            raise JobQueueFull(kind, len(self._queue), self.retry_after(kind))
        self._queue.append(ticket)
        self._dispatch()
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """The ticket's work ended (or never started): its place goes to the next that fits."""
        if ticket in self._running:
            self._running.remove(ticket)
            if ticket.started_at is not None:
                recent = self._durations.setdefault(ticket.kind, deque(maxlen=RECENT_DURATIONS))
                recent.append(time.monotonic() - ticket.started_at)
        elif ticket in self._queue:
            self._queue.remove(ticket)
        self._dispatch()

    @asynccontextmanager
    async def turn(self, kind: str, models: Sequence[str]) -> AsyncIterator[None]:
        """Wait for a turn (or get JobQueueFull) and hold it while the body runs."""
        ticket = self.enter(kind, models)
        try:
            await ticket.admitted.wait()
            yield
        finally:
            self.leave(ticket)

    def on_model(self, model: str) -> int:
        """How much work runs or waits on ``model`` (a model in use cannot be deleted)."""
        return sum(model in ticket.models for ticket in (*self._running, *self._queue))

    def retry_after(self, kind: str) -> int:
        """Seconds until a place is likely free: the mean of the kind's recent durations."""
        recent = self._durations.get(kind)
        if not recent:
            return DEFAULT_RETRY_AFTER_SECONDS
        return min(max(1, math.ceil(sum(recent) / len(recent))), MAX_RETRY_AFTER_SECONDS)

    def _fits(self, ticket: Ticket) -> bool:
        if sum(other.kind == ticket.kind for other in self._running) >= self._limits.per_kind:
            return False
        return all(
            sum(model in other.models for other in self._running) < self._limits.per_model
            for model in ticket.models
        )

    def _dispatch(self) -> None:
        # In queue order, everything that fits starts; a ticket held back by a busy model does not
        # hold back one behind it on other models.
        for ticket in list(self._queue):
            if self._fits(ticket):
                self._queue.remove(ticket)
                self._running.append(ticket)
                ticket.started_at, ticket.position = time.monotonic(), None
                ticket.admitted.set()
        for index, ticket in enumerate(self._queue, start=1):
            ticket.position = index
