"""The admin side of baking: check a bake request, run it as a job, serve the baked model, delete it.

Baked models live under the data dir (``baked/<name>/``: adapter, merged, loss curve) and are
served again when the server restarts. A bake that fails or is cancelled leaves no folder, and
deleting a baked model removes its folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_store.base import PersonaStore
from server.admin.jobs import Job, JobRegistry
from server.baking.bake import BackendLoader, BakeOrder, bake_persona
from server.baking.distill import BakeSpec
from server.baking.outputs import read_provenance
from server.serving.errors import ModelExists, ModelInUse, RequestRejected
from server.serving.model_registry import ModelRegistry

logger = logging.getLogger(__name__)
BAKED_DIR = "baked"
DRAIN_SECONDS = 30.0  # a deleted model's requests in flight may end before its engine closes
# A bake trains beside the engines serving chat: on half the cores at most, at a low priority.
TRAINING_THREADS = max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True)
class BakeOptions:
    strength: float | None
    rank: int
    trajectories: int
    steps: int
    max_tokens: int
    prompts: Sequence[str] | None
    served_name: str | None
    seed: int


class PersonaBakes:
    def __init__(
        self,
        registry: ModelRegistry,
        store: PersonaStore,
        jobs: JobRegistry,
        sources: dict[str, Path],
        data_dir: Path,
        default_prompts: Sequence[str],
        load: BackendLoader,
        max_strength: float,
        requests_in_flight: int,
    ) -> None:
        self._registry, self._store, self._jobs = registry, store, jobs
        self._sources = sources
        self._folder = data_dir / BAKED_DIR
        self._default_prompts = list(default_prompts)
        self._load = load
        self._max_strength = max_strength
        self._requests_in_flight = requests_in_flight  # of a bake's on its model's engine
        self._pending: set[str] = set()  # names of bakes under way

    def _source(self, model: str) -> Path:
        self._registry.get(model)  # 404 for a model not served
        source = self._sources.get(model)
        if source is None or not (source / "config.json").is_file():
            message = f"model '{model}' has no HF weights folder here to train (a GGUF model or a hub id)"
            raise RequestRejected(message, param="model")
        return source

    async def start(self, name: str, model: str, options: BakeOptions) -> Job:
        """Check what can be checked now (errors answer 4xx), then bake in the background."""
        source = self._source(model)
        record = await self._store.get(model, name)
        strength = record.info.default_strength if options.strength is None else options.strength
        if abs(strength) > self._max_strength:
            raise RequestRejected(
                f"strength {strength} is beyond the limit {self._max_strength}", param="strength"
            )
        served = options.served_name or f"{model}+{name}"
        if served in self._registry.ids or served in self._pending:
            raise ModelExists(served)
        order = BakeOrder(
            base_model=model,
            source=source,
            record=record,
            strength=strength,
            prompts=list(options.prompts or self._default_prompts),
            output=self._folder / served,
            model_id=served,
            trajectories=options.trajectories,
            max_tokens=options.max_tokens,
            spec=BakeSpec(rank=options.rank, steps=options.steps, seed=options.seed),
            requests_in_flight=self._requests_in_flight,
            training_threads=TRAINING_THREADS,
        )

        async def work(progress: Any) -> dict[str, Any]:
            outcome, baked = await bake_persona(self._registry.get(model), order, self._load, progress)
            self._registry.add(served, baked, parent=model, source=order.output / "merged")
            return outcome.to_dict()

        async def on_end(job: Job) -> None:
            self._pending.discard(served)
            if job.status != "succeeded":  # a bake that did not finish leaves nothing behind
                await asyncio.to_thread(shutil.rmtree, order.output, ignore_errors=True)

        job = self._jobs.submit("bake", work, models=[model], on_end=on_end)
        self._pending.add(served)
        return job

    async def delete(self, model: str) -> None:
        """Stop serving a model baked here and remove its folder; a base model, or one served from a
        folder of its own (``--model``), is not this service's to delete."""
        folder = self._folder / model
        if self._registry.source(model) != folder / "merged":
            self._registry.engine(model)  # 404 for a model not served
            raise RequestRejected(
                f"model '{model}' was not baked on this server: only baked models can be deleted",
                param="model",
            )
        if (jobs := self._jobs.admission.on_model(model)) > 0:
            raise ModelInUse(model, jobs)
        backend = await self._registry.remove(model, DRAIN_SECONDS)
        try:
            await backend.close()
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
        logger.info("deleted the baked model %s and %s", model, folder)

    async def serve_saved(self) -> list[str]:
        """Serve again every model baked here before (skipping a name already served)."""
        served = []
        for merged in sorted(self._folder.glob("*/merged")):
            provenance = read_provenance(merged)
            name = merged.parent.name
            # The retention is written last: a bake stopped before the end is not served.
            if provenance is None or "retention" not in provenance or name in self._registry.ids:
                continue
            parent = provenance.get("base_model")
            self._registry.add(name, await self._load(merged, name), parent=parent, source=merged)
            served.append(name)
        if served:
            logger.info("serving baked models: %s", ", ".join(served))
        return served
