"""An in-process read cache in front of a persona store.

A cached persona is served until a write drops it. Writes made through this cache drop it at once;
writes made by another replica drop it when the store's change feed (Redis pub/sub) reports them,
usually within milliseconds. Pub/sub is best-effort, so a cheap version probe backs it: every
``check_interval`` seconds while no feed is live, every ``heal_interval`` seconds while one is (a
message lost without the subscription breaking is then healed within that time). When the
subscription comes back after a break, every entry is probed again before its next use.

When the store is unreachable, a persona already cached keeps being served from memory, and only
uncached ones fail (StoreUnavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from persona_store.base import ChangeFeed, PersonaStore
from persona_store.errors import MappingNotFound, PersonaNotFound, StoreUnavailable, VersionConflict
from persona_store.mappings import MappingDraft, MappingInfo, MappingRecord
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StoreObserver(Protocol):
    """Told about every call that reaches the store and every cache lookup (metrics)."""

    def store_call(self, operation: str, seconds: float, failed: bool) -> None: ...

    def cache_lookup(self, hit: bool) -> None: ...


@dataclass
class _Entry:
    record: PersonaRecord
    checked_at: float


class CachingStore:
    def __init__(
        self,
        inner: PersonaStore,
        check_interval: float = 0.5,
        heal_interval: float = 5.0,
        resubscribe_delay: float = 1.0,
        observer: StoreObserver | None = None,
        clock: Callable[[], float] = time.monotonic,  # what the intervals are measured on (tests step it)
    ) -> None:
        self._inner = inner
        self._observer = observer
        self._clock = clock
        self._check_interval = check_interval
        self._heal_interval = heal_interval
        self._resubscribe_delay = resubscribe_delay
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._invalidations = 0  # bumped on every dropped entry, so a read racing a write can tell
        self._feed_live = False
        self._listener: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    @property
    def feed_live(self) -> bool:
        return self._feed_live

    @property
    def feed_state(self) -> str:
        """For /ready: 'live', 'down' (resubscribing; the version probe covers), or 'none'."""
        if self._listener is None:
            return "none"
        return "live" if self._feed_live else "down"

    def start(self) -> None:
        """Follow the store's change feed, when it has one (call from inside the event loop)."""
        if isinstance(self._inner, ChangeFeed) and self._listener is None:
            self._listener = asyncio.create_task(self._follow(self._inner), name="persona-cache-feed")

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        """Await a call to the store, telling the observer how long it took and whether it failed."""
        start = time.perf_counter()
        failed = True
        try:
            result = await call
            failed = False
            return result
        except (PersonaNotFound, MappingNotFound, VersionConflict):
            failed = False  # an answer, not a failure of the store
            raise
        finally:
            if self._observer is not None:
                self._observer.store_call(operation, time.perf_counter() - start, failed)

    def _lookup(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        if self._observer is not None:
            self._observer.cache_lookup(hit)

    async def _follow(self, feed: ChangeFeed) -> None:
        while True:
            try:
                async for model, name in feed.changes(on_live=self._on_feed_live):
                    self._drop(model, name)
            except StoreUnavailable as exc:
                logger.debug("persona change feed down: %s", exc)
            except Exception:  # the feed is an optimisation: never let it kill the cache
                logger.exception("persona change feed failed")
            self._feed_live = False
            await asyncio.sleep(self._resubscribe_delay)

    def _on_feed_live(self) -> None:
        # Messages sent while the feed was down are lost: probe every entry before its next use.
        for entry in self._entries.values():
            entry.checked_at = -math.inf
        self._feed_live = True

    def _drop(self, model: str, name: str) -> None:
        self._invalidations += 1
        self._entries.pop((model, name), None)

    async def get(self, model: str, name: str) -> PersonaRecord:
        key = (model, name)
        entry = self._entries.get(key)
        now = self._clock()
        interval = self._heal_interval if self._feed_live else self._check_interval
        if entry is not None and now - entry.checked_at < interval:
            self._lookup(hit=True)
            return entry.record
        invalidations = self._invalidations
        try:
            if (
                entry is not None
                and await self._timed("current_version", self._inner.current_version(model, name))
                == entry.record.info.version
            ):
                entry.checked_at = now
                self._lookup(hit=True)
                return entry.record
            record = await self._timed("get", self._inner.get(model, name))
        except StoreUnavailable:
            if entry is not None:  # stale beats unavailable: the persona was valid when last seen
                self._lookup(hit=True)
                return entry.record
            raise
        except PersonaNotFound:
            self._entries.pop(key, None)
            raise
        self._lookup(hit=False)
        # A write reported while we read may be newer than what we read: keep it, but probe next time.
        checked_at = now if invalidations == self._invalidations else -math.inf
        self._entries[key] = _Entry(record, checked_at)
        return record

    async def current_version(self, model: str, name: str) -> int | None:
        return await self._timed("current_version", self._inner.current_version(model, name))

    async def get_version(self, model: str, name: str, version: int) -> PersonaRecord:
        return await self._timed("get_version", self._inner.get_version(model, name, version))

    async def versions(self, model: str, name: str) -> list[PersonaInfo]:
        return await self._timed("versions", self._inner.versions(model, name))

    async def list(self, model: str | None = None) -> list[PersonaInfo]:
        return await self._timed("list", self._inner.list(model))

    # A write marks the entry for a probe before it starts (a read racing the write then keeps what
    # it read only until its next use) and drops it once the write succeeded. A write that failed
    # changes nothing, the cache included: in an outage the persona is still served from here.
    def _probe_next_time(self, model: str, name: str) -> None:
        self._invalidations += 1
        entry = self._entries.get((model, name))
        if entry is not None:
            entry.checked_at = -math.inf

    async def put(self, draft: PersonaDraft, expected_version: int | None = None) -> PersonaInfo:
        self._probe_next_time(draft.model, draft.name)
        info = await self._timed("put", self._inner.put(draft, expected_version))
        self._drop(draft.model, draft.name)
        return info

    async def delete(self, model: str, name: str, expected_version: int | None = None) -> None:
        self._probe_next_time(model, name)
        await self._timed("delete", self._inner.delete(model, name, expected_version))
        self._drop(model, name)

    async def put_mapping(self, draft: MappingDraft) -> MappingInfo:
        return await self._timed("put_mapping", self._inner.put_mapping(draft))

    async def get_mapping(self, mapping_id: str) -> MappingRecord:
        return await self._timed("get_mapping", self._inner.get_mapping(mapping_id))

    async def list_mappings(self) -> list[MappingInfo]:
        return await self._timed("list_mappings", self._inner.list_mappings())

    async def delete_mapping(self, mapping_id: str) -> None:
        await self._timed("delete_mapping", self._inner.delete_mapping(mapping_id))

    async def ping(self) -> None:
        await self._timed("ping", self._inner.ping())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._inner.close()
