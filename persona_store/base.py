"""The persona store protocol: SQLite (embedded) and Redis implement it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord


@runtime_checkable
class PersonaStore(Protocol):
    async def get(self, model: str, name: str) -> PersonaRecord:
        """The current version with its vectors; raises PersonaNotFound."""
        ...

    async def current_version(self, model: str, name: str) -> int | None:
        """The current version number, None when the persona does not exist (a cheap probe)."""
        ...

    async def list(self, model: str | None = None) -> list[PersonaInfo]:
        """Current personas (of one target model, or all), without vectors, sorted by name."""
        ...

    async def put(self, draft: PersonaDraft, expected_version: int | None = None) -> PersonaInfo:
        """Create or replace as a new version, atomically; raises VersionConflict on a stale expectation."""
        ...

    async def delete(self, model: str, name: str, expected_version: int | None = None) -> None:
        """Remove the persona; raises PersonaNotFound or VersionConflict."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None: ...
