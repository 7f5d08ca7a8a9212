"""A persona written to the mapping target while a mapping runs is never silently replaced.

The window between the mapper's look at the target and its write cannot be hit over HTTP on
purpose, so this drives the service in process, on a real SQLite store that lets another writer
in right after the look, and the tiny models' real backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from persona_store.records import PersonaDraft, PersonaRecord
from persona_store.sqlite import SQLiteStore
from server.admin.fitting_corpus import FittingCorpus
from server.admin.jobs import Job, JobRegistry
from server.admin.persona_admin import PersonaAdmin
from server.admin.persona_mapping import MapTarget, PersonaMapper
from server.engine.hf.backend import HFBackend
from server.serving.model_registry import ModelRegistry
from server.steering.mapping import MappingMethod

SOURCE, TARGET = "tiny-llama", "tiny-qwen"


class InterleavedStore(SQLiteStore):
    """Stores ``sneaked`` (once) right after the first read of its persona, found or not."""

    sneaked: PersonaDraft | None = None

    async def get(self, model: str, name: str) -> PersonaRecord:
        try:
            return await super().get(model, name)
        finally:
            draft = self.sneaked
            if draft is not None and (draft.model, draft.name) == (model, name):
                self.sneaked = None
                await self.put(draft)


@pytest.fixture(scope="module")
def qwen_backend(qwen_dir: Path) -> Iterator[HFBackend]:
    backend = HFBackend.load(qwen_dir, model_id=TARGET, max_batch_size=4)
    yield backend
    backend.scheduler.stop()


def vectors(width: int, seed: int) -> dict[int, np.ndarray]:
    return {1: np.random.default_rng(seed).standard_normal(width).astype(np.float32)}


@pytest.mark.parametrize("mapped_before", [False, True], ids=["absent", "mapped-from-same-source"])
async def test_a_persona_written_between_check_and_write_is_kept(
    llama_backend: HFBackend, qwen_backend: HFBackend, tmp_path: Path, mapped_before: bool
) -> None:
    store = InterleavedStore(tmp_path / "personas.sqlite3")
    registry = ModelRegistry({SOURCE: llama_backend, TARGET: qwen_backend}, max_in_flight=4)
    corpus = FittingCorpus("texts", ("the sea is wide",))  # only the generated method reads it
    admin = PersonaAdmin(registry, store, max_strength=50.0)
    mapper = PersonaMapper(registry, store, admin, corpus, JobRegistry())
    await store.put(PersonaDraft(model=SOURCE, name="pilot", vectors=vectors(64, 1)))
    target = MapTarget(TARGET, "pilot")

    async def mapped() -> Job:
        job = await mapper.start("pilot", SOURCE, target, None, MappingMethod.ZERO_PAD)
        assert job.task is not None
        await job.task
        return job

    if mapped_before:  # the check passes (it may replace this one) but the write must not
        assert (await mapped()).status == "succeeded"
    native = PersonaDraft(model=TARGET, name="pilot", vectors=vectors(48, 2), provenance={"kind": "uploaded"})
    store.sneaked = native
    job = await mapped()
    assert job.status == "failed" and job.error is not None and job.error.startswith("VersionConflict")
    kept = await store.get(TARGET, "pilot")
    assert kept.info.provenance == {"kind": "uploaded"} and np.array_equal(kept.vectors[1], native.vectors[1])
    await store.close()
