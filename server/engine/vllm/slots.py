"""Which steering plan each slot of a worker's tables holds (in_graph.py).

A slot holds one plan's vectors for every block; the tokens of every request with that plan read
it. Slots are kept for plans after their requests end, least recently used given up first, so a
persona that comes back finds its vectors in place. A forward never carries more plans than there
are slots: the front end admits no more distinct plans at once (slot_gate.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable


class SlotTable:
    def __init__(self, size: int) -> None:
        self.size = size
        self._held: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recent first
        self._free = list(range(size, 0, -1))  # slot 0 is the zeros every unsteered token reads

    def assign(self, keys: Iterable[Hashable]) -> dict[Hashable, tuple[int, bool]]:
        """A slot for each key one forward uses, and whether it is new to the key (its vectors must be
        written). Slots of keys this forward does not use are given up, oldest first, when no slot is
        free; a key that finds none is left out."""
        wanted = list(dict.fromkeys(keys))
        placed: dict[Hashable, tuple[int, bool]] = {}
        for key in wanted:
            if key in self._held:
                self._held.move_to_end(key)
                placed[key] = (self._held[key], False)
        for key in wanted:
            if key in placed:
                continue
            slot = self._take_slot(set(wanted))
            if slot is None:
                continue
            self._held[key] = slot
            placed[key] = (slot, True)
        return placed

    def _take_slot(self, in_use: set[Hashable]) -> int | None:
        if self._free:
            return self._free.pop()
        for key in self._held:
            if key not in in_use:
                return self._held.pop(key)
        return None

    def forget(self, key: Hashable) -> None:
        """A key whose vectors are gone (a dropped set): its slot is free again."""
        slot = self._held.pop(key, None)
        if slot is not None:
            self._free.append(slot)
