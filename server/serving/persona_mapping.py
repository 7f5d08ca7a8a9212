"""Carrying a stored persona to another served model with a stored map, and storing the result.

The method dispatch and strength calibration live in ``steering.persona_transfer``: this service
finds the records (the persona, the map, the concept personas) and stores the mapped persona with
its provenance, never over another persona by accident: a persona already under the target name
is replaced only when it was itself mapped from the same source persona and model, or when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persona_store.base import ABSENT, PersonaStore
from persona_store.errors import PersonaNotFound
from persona_store.mappings import MappingRecord
from persona_store.records import PersonaInfo, PersonaRecord
from server.engine.base import ModelInfo
from server.serving.errors import PersonaExists, RequestRejected
from server.serving.fitting_corpus import FittingCorpus
from server.serving.generated_transfer import GenerationSpec, carry_by_generation
from server.serving.job_admission import Admission
from server.serving.mapping_fits import check_distinct, check_mapping_id
from server.serving.model_registry import ModelRegistry
from server.serving.persona_admin import PersonaAdmin
from server.steering.errors import SteeringError
from server.steering.mapping import MappingMethod
from server.steering.persona_transfer import (
    LEARNED_METHODS,
    ConceptPair,
    FittedMap,
    ModelShape,
    map_persona_vectors,
)


def fitted_map(record: MappingRecord) -> FittedMap:
    """A stored mapping as the transfer maths takes it."""
    metadata = record.info.metadata
    return FittedMap(
        method=str(metadata.get("method")),
        matrices=record.matrices,
        layer_map=record.info.layer_map,
        source_norms={int(b): float(n) for b, n in metadata.get("source_norms", {}).items()},
        target_norms={int(b): float(n) for b, n in metadata.get("target_norms", {}).items()},
    )


def model_shape(info: ModelInfo) -> ModelShape:
    return ModelShape(info.num_layers, info.hidden_size, tuple(info.steerable_layers))


@dataclass(frozen=True)
class MapTarget:
    """Where a mapped persona goes: a served model, the name to store it under, whether it may
    replace a persona of that name that was not mapped from the same source."""

    model: str
    name: str
    replace: bool = False


def mapped_from(info: PersonaInfo, source_model: str, source_name: str) -> bool:
    """Whether the persona was mapped from ``source_name`` on ``source_model`` (re-mapping it, after a
    new fit or with another method, is an update, not an accident)."""
    provenance = info.provenance
    # Personas mapped before target_name existed carry no source_name: they kept the source's name.
    return (
        provenance.get("kind") == "mapped"
        and provenance.get("source_model") == source_model
        and provenance.get("source_name", info.name) == source_name
    )


def describe_provenance(info: PersonaInfo) -> str:
    provenance = info.provenance
    kind = str(provenance.get("kind", "of unknown origin"))
    if kind != "mapped":
        return kind
    return f"mapped from '{provenance.get('source_name', info.name)}' on '{provenance.get('source_model')}'"


# How many texts of the fitting corpus the generated method's source answers (twice each), and how
# many of them the target answers per calibration step. Few suffice: on the demo models 18 prompts
# carried as much as 140 (README, ablations), and the map request waits for all of it.
GENERATION_PROMPTS = 48
CALIBRATION_PROMPTS = 24


class PersonaMapper:
    def __init__(
        self,
        registry: ModelRegistry,
        store: PersonaStore,
        admin: PersonaAdmin,
        corpus: FittingCorpus,
        admission: Admission,
    ) -> None:
        self._registry = registry
        self._store = store
        self._admin = admin
        self._admission = admission
        self._generation = GenerationSpec(
            prompts=corpus.texts[:GENERATION_PROMPTS], calibration_prompts=CALIBRATION_PROMPTS
        )

    async def map_persona(
        self, name: str, source_model: str, target: MapTarget, mapping_id: str | None, method: MappingMethod
    ) -> PersonaInfo:
        self._admin.check_name(name)
        self._admin.check_name(target.name)
        self._registry.get(source_model)
        self._registry.get(target.model)
        check_distinct(source_model, target.model)
        record = await self._store.get(source_model, name)
        mapping = await self._usable_mapping(source_model, target.model, mapping_id, method)
        # After the checks that say the request cannot map at all, before the (possibly slow) maths;
        # the write expects the version seen here, so a persona written to the target meanwhile is a
        # 409 version_conflict, never silently replaced.
        expected = None if target.replace else await self._expected_target(name, source_model, target)
        layers, calibration = await self._map_vectors(record, source_model, target.model, mapping, method)
        return await self._admin.put(
            name=target.name,
            model=target.model,
            layers={block: vector.tolist() for block, vector in layers.items()},
            default_strength=record.info.default_strength,
            description=record.info.description,
            default_positions=record.info.default_positions,
            expected_version=expected,
            provenance={
                "kind": "mapped",
                "source_model": source_model,
                "source_name": name,
                "source_version": record.info.version,
                "method": method.value,
                "mapping_id": None if mapping is None else mapping.info.id,
                **({} if calibration is None else {"strength_calibration": calibration}),
            },
        )

    async def _expected_target(self, name: str, source_model: str, target: MapTarget) -> int:
        """The target's current version when mapping may replace it; ABSENT when it holds none."""
        try:
            existing = (await self._store.get(target.model, target.name)).info
        except PersonaNotFound:  # never written, or deleted: nothing to lose
            return ABSENT
        if mapped_from(existing, source_model, name):
            return existing.version
        raise PersonaExists(
            f"persona '{target.name}' already exists for model '{target.model}' (version "
            f"{existing.version}, {describe_provenance(existing)}); mapping '{name}' from '{source_model}' "
            "would replace it: pass target_name to store the mapped persona under another name, or "
            "replace: true to replace it",
            param="target_name",
        )

    async def _usable_mapping(
        self, source_model: str, target_model: str, mapping_id: str | None, method: MappingMethod
    ) -> MappingRecord | None:
        """The stored mapping the method goes through: required by a learned method, else optional."""
        # A learned method applies its own map; the others use the ridge fit (if any) for target
        # blocks and norm calibration.
        wanted = method.value if method in LEARNED_METHODS else MappingMethod.RIDGE.value
        mapping = await self._mapping_for(source_model, target_model, wanted, mapping_id)
        if mapping is None and method in LEARNED_METHODS:
            raise RequestRejected(
                f"no {method.value} mapping from '{source_model}' to '{target_model}': fit one with "
                "POST /admin/mappings first",
                param="mapping_id",
            )
        return mapping

    async def _map_vectors(
        self,
        record: PersonaRecord,
        source_model: str,
        target_model: str,
        mapping: MappingRecord | None,
        method: MappingMethod,
    ) -> tuple[dict[int, np.ndarray], dict[str, object] | None]:
        """The persona's vectors on the target model by target block, and how their scale was
        calibrated on the target (the generated method; the maps' vectors are norm-calibrated only)."""
        info = record.info
        if method is MappingMethod.GENERATED:
            # Both models generate and read for a while, as a job does: it waits for a turn among
            # the jobs (429 past their queue), the other methods are arithmetic on stored vectors.
            async with self._admission.turn("map", (source_model, target_model)):
                carried = await carry_by_generation(
                    self._registry.get(source_model),
                    self._registry.get(target_model),
                    record.vectors,
                    info.default_strength,
                    info.default_positions,
                    self._generation,
                )
            return carried.vectors, carried.provenance()
        concepts = (
            await self._concept_pairs(record.info.name, source_model, target_model)
            if method is MappingMethod.CONCEPT
            else []
        )
        vectors = map_persona_vectors(
            method,
            record.vectors,
            model_shape(self._registry.get(source_model).info),
            model_shape(self._registry.get(target_model).info),
            fitted=None if mapping is None else fitted_map(mapping),
            concepts=concepts,
        )
        return vectors, None

    async def _mapping_for(
        self, source_model: str, target_model: str, method: str, mapping_id: str | None
    ) -> MappingRecord | None:
        """The named mapping (checked against the pair and method), else the newest that fits."""
        if mapping_id is not None:
            check_mapping_id(mapping_id)
            record = await self._store.get_mapping(mapping_id)
            info = record.info
            if (info.source_model, info.target_model) != (source_model, target_model):
                raise SteeringError(
                    f"mapping {mapping_id} maps '{info.source_model}' to '{info.target_model}', "
                    f"not '{source_model}' to '{target_model}'",
                    param="mapping_id",
                )
            if info.metadata.get("method") != method:
                raise SteeringError(
                    f"mapping {mapping_id} is a {info.metadata.get('method')} map, not {method}",
                    param="mapping_id",
                )
            return record
        pair = (source_model, target_model)
        candidates = [
            m
            for m in await self._store.list_mappings()
            if (m.source_model, m.target_model) == pair and m.metadata.get("method") == method
        ]
        if not candidates:
            return None
        return await self._store.get_mapping(candidates[-1].id)  # the newest

    async def _concept_pairs(self, name: str, source_model: str, target_model: str) -> list[ConceptPair]:
        """Every other persona that exists natively (not mapped) on both models: its vectors on both."""
        targets = {info.name: info for info in await self._store.list(target_model)}
        pairs: list[ConceptPair] = []
        for info in await self._store.list(source_model):
            other = targets.get(info.name)
            if info.name == name or other is None or other.provenance.get("kind") == "mapped":
                continue
            source = await self._store.get(source_model, info.name)
            target = await self._store.get(target_model, info.name)
            pairs.append((source.vectors, target.vectors))
        return pairs
