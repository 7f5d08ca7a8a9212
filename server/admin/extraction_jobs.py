"""The admin side of extraction: validate a request, run it as a job, store the persona it yields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.admin.extraction import ExtractionSpec, extract
from server.admin.jobs import Job, JobRegistry
from server.admin.persona_admin import PersonaAdmin
from server.serving.errors import RequestRejected
from server.serving.model_registry import ModelRegistry
from server.steering.errors import SteeringError

MAX_EXTRACTION_ANSWERS = 20_000


class PersonaExtraction:
    def __init__(self, registry: ModelRegistry, admin: PersonaAdmin, jobs: JobRegistry) -> None:
        self._registry = registry
        self._admin = admin
        self._jobs = jobs

    def start(
        self,
        name: str,
        model: str,
        spec: ExtractionSpec,
        layers: list[int] | None,
        default_strength: float | None,
        description: str,
    ) -> Job:
        """Check everything that can be checked now (errors answer 4xx), then run in the background."""
        backend = self._registry.get(model)
        self._admin.check_name(name)
        for layer in layers or []:
            if layer not in backend.info.steerable_layers:
                raise SteeringError(
                    f"layer {layer} is outside model '{model}' (blocks 0..{backend.info.num_layers - 1})",
                    param="layers",
                )
        answers = len(spec.questions) * spec.samples_per_question * 2
        if answers > MAX_EXTRACTION_ANSWERS:
            raise RequestRejected(
                f"the extraction asks for {answers} answers; at most {MAX_EXTRACTION_ANSWERS}",
                param="questions",
            )

        async def work(progress: Callable[[float], None]) -> dict[str, Any]:
            result = await extract(backend, spec, lambda fraction: progress(0.99 * fraction))
            chosen = layers or [result.directions.recommended_layer]
            info = await self._admin.put(
                name=name,
                model=model,
                layers={layer: result.directions.vectors[layer].tolist() for layer in chosen},
                default_strength=1.0 if default_strength is None else default_strength,
                description=description,
                provenance={
                    "kind": "extracted",
                    "questions": len(spec.questions),
                    "samples_per_question": spec.samples_per_question,
                    "recommended_layer": result.directions.recommended_layer,
                },
            )
            return {"persona": info.to_dict(), **result.summary()}

        return self._jobs.submit("extraction", work, models=[model])
