"""The admin side of baking: check a bake request, run it as a job, serve the baked model.

Baked models live under the data dir (``baked/<name>/``: adapter, merged, loss curve) and are
served again when the server restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_store.base import PersonaStore
from server.baking.distill import BakeSpec
from server.baking.outputs import read_provenance
from server.serving.background import Job, JobRegistry
from server.serving.errors import ModelExists, RequestRejected
from server.serving.model_registry import ModelRegistry
from server.serving.persona_baking import BackendLoader, BakeOrder, bake_persona

logger = logging.getLogger(__name__)
BAKED_DIR = "baked"


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
    ) -> None:
        self._registry, self._store, self._jobs = registry, store, jobs
        self._sources = sources
        self._folder = data_dir / BAKED_DIR
        self._default_prompts = list(default_prompts)
        self._load = load
        self._max_strength = max_strength
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
            base_model=model, source=source, record=record, strength=strength,
            prompts=list(options.prompts or self._default_prompts), output=self._folder / served,
            model_id=served, trajectories=options.trajectories, max_tokens=options.max_tokens,
            spec=BakeSpec(rank=options.rank, steps=options.steps, seed=options.seed),
        )  # fmt: skip
        self._pending.add(served)

        async def work(progress: Any) -> dict[str, Any]:
            try:
                outcome, baked = await bake_persona(self._registry.get(model), order, self._load, progress)
                self._registry.add(served, baked, parent=model, source=order.output / "merged")
            finally:
                self._pending.discard(served)
            return outcome.to_dict()

        return self._jobs.submit("bake", work)

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
