"""Restoring an old version of a persona: the old content becomes a new version.

Versions never repeat and never change, so a restore is an ordinary write of the old vectors and
metadata (guarded by the same expected version as any write), and the history stays readable.
"""

from __future__ import annotations

from persona_store.base import PersonaStore
from persona_store.records import PersonaDraft, PersonaInfo


async def restore_version(
    store: PersonaStore, model: str, name: str, version: int, expected_version: int | None = None
) -> PersonaInfo:
    old = await store.get_version(model, name, version)
    draft = PersonaDraft(
        model=model,
        name=name,
        vectors=old.vectors,
        default_strength=old.info.default_strength,
        description=old.info.description,
        provenance={**old.info.provenance, "restored_from": version},
        default_positions=old.info.default_positions,
    )
    return await store.put(draft, expected_version)
