"""An in-process read cache in front of a persona store.

A cached persona is served as long as a cheap version probe (at most every ``check_interval``
seconds) finds the same current version; so a write on another replica is served here within that
interval. When the store is unreachable, a persona already cached keeps being served from memory,
and only uncached ones fail (StoreUnavailable). Writes go straight through and drop the entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from persona_store.base import PersonaStore
from persona_store.errors import PersonaNotFound, StoreUnavailable
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord


@dataclass
class _Entry:
    record: PersonaRecord
    checked_at: float


class CachingStore:
    def __init__(self, inner: PersonaStore, check_interval: float = 0.5) -> None:
        self._inner = inner
        self._check_interval = check_interval
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, model: str, name: str) -> PersonaRecord:
        key = (model, name)
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is not None and now - entry.checked_at < self._check_interval:
            self.hits += 1
            return entry.record
        try:
            if (
                entry is not None
                and await self._inner.current_version(model, name) == entry.record.info.version
            ):
                entry.checked_at = now
                self.hits += 1
                return entry.record
            record = await self._inner.get(model, name)
        except StoreUnavailable:
            if entry is not None:  # stale beats unavailable: the persona was valid when last seen
                self.hits += 1
                return entry.record
            raise
        except PersonaNotFound:
            self._entries.pop(key, None)
            raise
        self.misses += 1
        self._entries[key] = _Entry(record, now)
        return record

    async def current_version(self, model: str, name: str) -> int | None:
        return await self._inner.current_version(model, name)

    async def list(self, model: str | None = None) -> list[PersonaInfo]:
        return await self._inner.list(model)

    async def put(self, draft: PersonaDraft, expected_version: int | None = None) -> PersonaInfo:
        self._entries.pop((draft.model, draft.name), None)
        return await self._inner.put(draft, expected_version)

    async def delete(self, model: str, name: str, expected_version: int | None = None) -> None:
        self._entries.pop((model, name), None)
        await self._inner.delete(model, name, expected_version)

    async def ping(self) -> None:
        await self._inner.ping()

    async def close(self) -> None:
        await self._inner.close()
