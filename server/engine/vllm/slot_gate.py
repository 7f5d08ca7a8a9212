"""How many steering slots the requests in flight may need at once, from the front end's side.

Each worker holds a fixed number of slots (in_graph.py); every distinct plan in a forward takes one,
and a closed loop takes slots of its own (up to ``LOOP_DEMAND`` in one forward: its prompt's parts
and its generated tokens). A request whose plan is already in flight shares its slot; one that would
need more slots than are free waits here, before vLLM sees it, until requests end: it never fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

# The most slots one closed-loop request takes in one forward: the prompt's tokens that all its
# prompt steering reaches, its last prompt token (where rules steering the response start), and
# its generated tokens.
LOOP_DEMAND = 3
MIN_SLOTS = LOOP_DEMAND + 1  # a closed loop's and its plan's


class SlotGate:
    def __init__(self, slots: int) -> None:
        if slots < MIN_SLOTS:
            raise ValueError(f"a closed loop and its plan need {MIN_SLOTS} steering slots")
        self.slots = slots
        self._users: dict[Hashable, tuple[int, int]] = {}  # key -> (requests, slots taken)
        self._changed = asyncio.Condition()

    @property
    def taken(self) -> int:
        return sum(demand for _, demand in self._users.values())

    def _fits(self, wanted: dict[Hashable, int]) -> bool:
        new = sum(demand for key, demand in wanted.items() if key not in self._users)
        return self.taken + new <= self.slots

    @asynccontextmanager
    async def admit(self, wanted: dict[Hashable, int]) -> AsyncIterator[None]:
        """Hold slots for a request's keys (key -> slots it takes; a key in flight already is shared)
        while the request runs, all at once so that no two requests each hold part of what they need.
        An unsteered request wants none and passes at once."""
        if not wanted:
            yield
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits(wanted))
            for key, demand in wanted.items():
                users, held = self._users.get(key, (0, demand))
                self._users[key] = (users + 1, held)
        try:
            yield
        finally:
            async with self._changed:
                for key in wanted:
                    users, held = self._users[key]
                    if users > 1:
                        self._users[key] = (users - 1, held)
                    else:
                        del self._users[key]
                self._changed.notify_all()
