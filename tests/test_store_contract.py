"""One contract, two persona stores: the embedded SQLite store and the shared Redis store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from persona_store.base import PersonaStore
from persona_store.errors import PersonaNotFound, VersionConflict
from persona_store.records import PersonaDraft, vectors_checksum
from persona_store.redis import RedisStore
from persona_store.sqlite import SQLiteStore
from tests.redis_process import RedisProcess


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PersonaStore]:
    if request.param == "sqlite":
        opened: PersonaStore = SQLiteStore(tmp_path / "personas.sqlite3", keep_versions=3)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        server.flush()
        opened = RedisStore.from_url(server.url, keep_versions=3)
    yield opened
    await opened.close()


def draft(name: str = "pirate", model: str = "org/model-7b", seed: int = 0, **fields: object) -> PersonaDraft:
    rng = np.random.default_rng(seed)
    vectors = {3: rng.standard_normal(16).astype(np.float32), 7: rng.standard_normal(16).astype(np.float32)}
    return PersonaDraft(model=model, name=name, vectors=vectors, **fields)  # type: ignore[arg-type]


async def test_a_written_persona_reads_back_exactly(store: PersonaStore) -> None:
    written = draft(default_strength=2.5, description="arr", default_positions="prompt",
                    provenance={"kind": "extracted", "questions": 3})  # fmt: skip
    info = await store.put(written)
    assert (info.version, info.layers, info.hidden_size) == (1, (3, 7), 16)
    record = await store.get("org/model-7b", "pirate")
    assert record.info == info
    assert record.info.checksum == vectors_checksum(written.vectors)
    assert record.info.default_positions == "prompt" and record.info.provenance["questions"] == 3
    for layer, vector in written.vectors.items():
        assert np.array_equal(record.vectors[layer], vector)


async def test_replacing_makes_a_new_version_and_stale_writes_conflict(store: PersonaStore) -> None:
    await store.put(draft(seed=1))
    second = await store.put(draft(seed=2), expected_version=1)
    assert second.version == 2
    with pytest.raises(VersionConflict):
        await store.put(draft(seed=3), expected_version=1)
    assert (await store.get("org/model-7b", "pirate")).info.checksum == second.checksum


async def test_personas_are_keyed_by_model_and_name(store: PersonaStore) -> None:
    await store.put(draft(model="a:b/c d"))
    await store.put(draft(model="other", name="formal"))
    with pytest.raises(PersonaNotFound):
        await store.get("other", "pirate")
    assert [(i.model, i.name) for i in await store.list("a:b/c d")] == [("a:b/c d", "pirate")]
    assert [(i.model, i.name) for i in await store.list()] == [("a:b/c d", "pirate"), ("other", "formal")]


async def test_delete_removes_and_versions_never_repeat(store: PersonaStore) -> None:
    await store.put(draft())
    with pytest.raises(VersionConflict):
        await store.delete("org/model-7b", "pirate", expected_version=5)
    await store.delete("org/model-7b", "pirate")
    with pytest.raises(PersonaNotFound):
        await store.get("org/model-7b", "pirate")
    with pytest.raises(PersonaNotFound):
        await store.delete("org/model-7b", "pirate")
    assert await store.list("org/model-7b") == []
    assert (await store.put(draft())).version == 2


async def test_concurrent_writers_get_distinct_versions(store: PersonaStore) -> None:
    infos = await asyncio.gather(*(store.put(draft(seed=i)) for i in range(8)))
    assert sorted(info.version for info in infos) == list(range(1, 9))
    current = await store.get("org/model-7b", "pirate")
    assert current.info.version == 8


async def test_ping_answers(store: PersonaStore) -> None:
    await store.ping()


async def test_current_version_is_a_cheap_probe(store: PersonaStore) -> None:
    assert await store.current_version("org/model-7b", "pirate") is None
    await store.put(draft())
    await store.put(draft(seed=4))
    assert await store.current_version("org/model-7b", "pirate") == 2
    await store.delete("org/model-7b", "pirate")
    assert await store.current_version("org/model-7b", "pirate") is None
