"""Which vector sets vLLM's workers hold, from the front end's side.

A set is sent to the workers once, under the digest of its vectors (``PlanTerm.key``), and stays
while requests use it. Sets no request uses are dropped from the workers when more than ``capacity``
are held, least recently used first. A term names its source (a persona of a model); when a set of
the same source with other vectors arrives (an update, here or on another replica), the old set is
dropped as soon as no request uses it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from server.engine.vllm.wire import pack
from server.steering.plan import PlanTerm

Rpc = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


class ResidentSets:
    def __init__(self, rpc: Rpc, capacity: int = 64) -> None:
        self._rpc = rpc  # collective_rpc(method, args) on every worker
        self._capacity = capacity
        self._users: OrderedDict[str, int] = OrderedDict()  # key -> requests using it, LRU order
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._latest: dict[str, str] = {}  # source -> key of its newest set
        self._superseded: set[str] = set()
        self._lock = asyncio.Lock()  # evictions and loads do not interleave with each other

    @property
    def held(self) -> list[str]:
        return list(self._users)

    async def acquire(self, terms: Iterable[PlanTerm]) -> list[str]:
        """Make sure the workers hold every term's set; the caller must ``release`` the keys."""
        keys: list[str] = []
        try:
            for term in terms:
                await self._ensure(term)
                keys.append(term.key)
        except BaseException:
            self.release(keys)
            raise
        return keys

    async def _ensure(self, term: PlanTerm) -> None:
        key = term.key
        while key not in self._users:
            pending = self._loading.get(key)
            if pending is not None:  # another request is sending the same set
                await asyncio.shield(pending)
                continue
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._loading[key] = future
            try:
                async with self._lock:
                    vectors = {layer: pack(vector.numpy()) for layer, vector in term.vectors.items()}
                    await self._rpc("persona_load", (key, vectors))
                    self._users[key] = 0
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiting requests re-raise it themselves
                raise
            finally:
                del self._loading[key]
        self._users[key] += 1
        self._users.move_to_end(key)
        if term.source:
            previous = self._latest.get(term.source)
            if previous is not None and previous != key:
                self._superseded.add(previous)
            self._latest[term.source] = key
            self._superseded.discard(key)

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key in self._users:
                self._users[key] -= 1

    def droppable(self) -> list[str]:
        """Sets to drop: unused superseded ones, and unused ones beyond ``capacity``, oldest first."""
        idle = [key for key, users in self._users.items() if users <= 0]
        stale = [key for key in idle if key in self._superseded]
        excess = len(self._users) - len(stale) - self._capacity
        rest = [key for key in idle if key not in self._superseded]
        return stale + rest[: max(excess, 0)]

    async def evict(self) -> None:
        """Drop unused sets beyond capacity from the workers."""
        async with self._lock:
            keys = self.droppable()
            if not keys:
                return
            for key in keys:
                del self._users[key]
                self._superseded.discard(key)
            await self._rpc("persona_drop", (keys,))
