"""One contract, two persona stores: the embedded SQLite store and the shared Redis store."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from persona_store.arrays import matrices_checksum, vectors_checksum
from persona_store.base import ABSENT, PersonaStore
from persona_store.errors import (
    MappingNotFound,
    PersonaNotFound,
    PersonaVersionNotFound,
    StoreUnavailable,
    VersionConflict,
)
from persona_store.history import restore_version
from persona_store.mappings import MappingDraft, is_valid_mapping_id
from persona_store.records import PersonaDraft
from persona_store.redis import RedisStore
from persona_store.sqlite import SQLiteStore
from tests.redis_process import RedisProcess


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=[pytest.mark.integration, pytest.mark.redis])])
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
    written = draft(
        default_strength=2.5,
        description="arr",
        default_positions="prompt",
        provenance={"kind": "extracted", "questions": 3},
    )
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


async def test_expecting_version_0_writes_only_where_no_persona_is_current(store: PersonaStore) -> None:
    created = await store.put(draft(seed=1), expected_version=ABSENT)
    with pytest.raises(VersionConflict) as conflict:
        await store.put(draft(seed=2), expected_version=ABSENT)
    assert (conflict.value.expected, conflict.value.actual) == (ABSENT, 1)
    assert (await store.get("org/model-7b", "pirate")).info.checksum == created.checksum
    await store.delete("org/model-7b", "pirate")
    assert (await store.put(draft(seed=3), expected_version=ABSENT)).version == 2  # deleted: none current


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


async def unreachable_twin(store: PersonaStore, directory: Path) -> PersonaStore:
    """A store of the same kind that cannot answer: SQLite once closed, Redis with no server there."""
    if isinstance(store, SQLiteStore):
        closed = SQLiteStore(directory / "closed.sqlite3")
        await closed.close()
        return closed
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return RedisStore.from_url(f"redis://127.0.0.1:{port}/0")


async def test_ping_answers(store: PersonaStore, tmp_path: Path) -> None:
    """Ping returns while the store answers and raises StoreUnavailable when it cannot (/ready's 503)."""
    assert await store.ping() is None
    unreachable = await unreachable_twin(store, tmp_path)
    with pytest.raises(StoreUnavailable):
        await unreachable.ping()
    with pytest.raises(StoreUnavailable):  # every other call as well: the API answers 503, never 500
        await unreachable.get("org/model-7b", "pirate")
    await unreachable.close()


async def test_current_version_is_a_cheap_probe(store: PersonaStore) -> None:
    assert await store.current_version("org/model-7b", "pirate") is None
    await store.put(draft())
    await store.put(draft(seed=4))
    assert await store.current_version("org/model-7b", "pirate") == 2
    await store.delete("org/model-7b", "pirate")
    assert await store.current_version("org/model-7b", "pirate") is None


async def test_the_last_versions_are_kept_and_one_can_be_restored(store: PersonaStore) -> None:
    written = [await store.put(draft(seed=seed, description=f"take {seed}")) for seed in range(1, 6)]
    kept = await store.versions("org/model-7b", "pirate")
    assert [info.version for info in kept] == [5, 4, 3]  # keep_versions=3, newest first
    with pytest.raises(PersonaVersionNotFound):
        await store.get_version("org/model-7b", "pirate", 2)
    old = await store.get_version("org/model-7b", "pirate", 3)
    assert old.info == written[2] and old.info.description == "take 3"

    with pytest.raises(VersionConflict):
        await restore_version(store, "org/model-7b", "pirate", 3, expected_version=4)
    restored = await restore_version(store, "org/model-7b", "pirate", 3, expected_version=5)
    assert restored.version == 6 and restored.checksum == written[2].checksum
    assert restored.provenance == {"kind": "uploaded", "restored_from": 3}
    current = await store.get("org/model-7b", "pirate")
    assert current.info == restored and current.info.description == "take 3"


async def test_a_deleted_persona_keeps_its_history_for_restoring(store: PersonaStore) -> None:
    first = await store.put(draft(seed=1))
    await store.delete("org/model-7b", "pirate")
    assert [info.version for info in await store.versions("org/model-7b", "pirate")] == [1]
    restored = await restore_version(store, "org/model-7b", "pirate", 1)
    assert (restored.version, restored.checksum) == (2, first.checksum)
    assert await store.versions("other", "pirate") == []


def mapping_draft(rows: int = 24, cols: int = 40, seed: int = 0) -> MappingDraft:
    rng = np.random.default_rng(seed)
    return MappingDraft(
        source_model="org/small",
        target_model="org/big:v2",
        matrices={5: rng.standard_normal((rows, cols)), 2: rng.standard_normal((rows, cols))},
        layer_map={5: 9, 2: 3},
        metadata={"method": "ridge", "lambda": 10.0, "r2": {"2": 0.8, "5": 0.7}},
    )


async def test_mappings_are_stored_listed_and_deleted(store: PersonaStore) -> None:
    written = mapping_draft()
    info = await store.put_mapping(written)
    assert is_valid_mapping_id(info.id)
    assert (info.source_hidden_size, info.target_hidden_size, info.layer_map) == (24, 40, {2: 3, 5: 9})
    assert info.checksum == matrices_checksum(written.matrices)
    record = await store.get_mapping(info.id)
    assert record.info == info and list(record.matrices) == [2, 5]
    for layer, matrix in written.matrices.items():
        assert np.array_equal(record.matrices[layer], matrix)
    second = await store.put_mapping(mapping_draft(seed=1))
    assert [m.id for m in await store.list_mappings()] == [info.id, second.id]
    await store.delete_mapping(info.id)
    with pytest.raises(MappingNotFound):
        await store.get_mapping(info.id)
    with pytest.raises(MappingNotFound):
        await store.delete_mapping(info.id)
    assert [m.id for m in await store.list_mappings()] == [second.id]


async def test_a_mapping_of_real_size_round_trips(store: PersonaStore) -> None:
    # 3584 -> 4096 (a 7B Qwen onto an 8B Llama): 58 MB of float32 for one block.
    matrix = np.random.default_rng(0).standard_normal((3584, 4096), dtype=np.float32)
    info = await store.put_mapping(MappingDraft("a", "b", {20: matrix}, {20: 22}))
    record = await store.get_mapping(info.id)
    assert np.array_equal(record.matrices[20], matrix) and record.info.checksum == info.checksum
