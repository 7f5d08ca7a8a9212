"""The persona store protocol: SQLite (embedded) and Redis implement it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from persona_store.mappings import MappingDraft, MappingInfo, MappingRecord
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord

# An expected version that holds only while no version is current (never written, or deleted):
# versions start at 1, so 0 is never a real one. It makes a create that must not replace.
ABSENT = 0


@runtime_checkable
class PersonaStore(Protocol):
    async def get(self, model: str, name: str) -> PersonaRecord:
        """The current version with its vectors; raises PersonaNotFound."""
        ...

    async def current_version(self, model: str, name: str) -> int | None:
        """The current version number, None when the persona does not exist (a cheap probe)."""
        ...

    async def get_version(self, model: str, name: str, version: int) -> PersonaRecord:
        """One kept version, current or not (even of a deleted persona); raises PersonaVersionNotFound."""
        ...

    async def versions(self, model: str, name: str) -> list[PersonaInfo]:
        """The kept versions, newest first (empty when none is kept)."""
        ...

    async def list(self, model: str | None = None) -> list[PersonaInfo]:
        """Current personas (of one target model, or all), without vectors, sorted by name."""
        ...

    async def put(self, draft: PersonaDraft, expected_version: int | None = None) -> PersonaInfo:
        """Create or replace as a new version, atomically; raises VersionConflict on a stale expectation
        (``ABSENT``: only if no version is current)."""
        ...

    async def delete(self, model: str, name: str, expected_version: int | None = None) -> None:
        """Remove the persona; raises PersonaNotFound or VersionConflict."""
        ...

    async def put_mapping(self, draft: MappingDraft) -> MappingInfo:
        """Store a mapping under a new id, atomically."""
        ...

    async def get_mapping(self, mapping_id: str) -> MappingRecord:
        """The mapping with its matrices; raises MappingNotFound."""
        ...

    async def list_mappings(self) -> list[MappingInfo]:
        """Every mapping, without matrices, oldest first."""
        ...

    async def delete_mapping(self, mapping_id: str) -> None:
        """Remove the mapping; raises MappingNotFound."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ChangeFeed(Protocol):
    """A store that tells its readers about writes made by any replica (Redis pub/sub)."""

    def changes(self, on_live: Callable[[], None]) -> AsyncIterator[tuple[str, str]]:
        """(model, name) of each persona written or deleted; ``on_live`` runs once subscribed.

        Best-effort: changes made while the feed is down are not replayed. Raises StoreUnavailable
        when the connection breaks.
        """
        ...
