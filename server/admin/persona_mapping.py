"""Carrying a stored persona to another served model with a stored map, and storing the result.

A map request is a background job (``jobs.py``): what can be refused is refused when it is asked
(4xx), then the carrying runs (the generated method answers and reads hundreds of prompts: minutes on
a real model) with progress, cancellable; the job's result is the stored persona, and says whether
the source persona was updated while it was carried (the map is then of the version it started with).

The carrying itself, by any method, is ``server.transfer.carry.carry_persona`` (the evaluation's
transfer table calls it too): this service finds the records (the persona, the map, the concept
personas) and stores the mapped persona with its provenance, never over another persona by
accident: a persona already under the target name is replaced only when it was itself mapped from
the same source persona and model, or when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from persona_store.base import ABSENT, PersonaStore
from persona_store.errors import PersonaNotFound
from persona_store.mappings import MappingRecord
from persona_store.records import PersonaInfo, PersonaRecord
from server.admin.fitting_corpus import FittingCorpus
from server.admin.jobs import Job, JobRegistry
from server.admin.mapping_fits import check_distinct, check_mapping_id
from server.admin.persona_admin import PersonaAdmin
from server.serving.errors import PersonaExists, RequestRejected
from server.serving.model_registry import ModelRegistry
from server.steering.errors import SteeringError
from server.steering.mapping import MappingMethod
from server.transfer.carry import CarriedPersona, GenerationSpec, SourcePersona, carry_persona, drives_models
from server.transfer.maps import LEARNED_METHODS, ConceptPair, FittedMap, map_kind


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


class PersonaMapper:
    def __init__(
        self,
        registry: ModelRegistry,
        store: PersonaStore,
        admin: PersonaAdmin,
        corpus: FittingCorpus,
        jobs: JobRegistry,
    ) -> None:
        self._registry = registry
        self._store = store
        self._admin = admin
        self._jobs = jobs
        self._generation = GenerationSpec.server_default(corpus.texts)

    async def start(
        self, name: str, source_model: str, target: MapTarget, mapping_id: str | None, method: MappingMethod
    ) -> Job:
        """Check everything that can be checked now (errors answer 4xx), then map in the background."""
        self._admin.check_name(name)
        self._admin.check_name(target.name)
        self._registry.get(source_model)
        self._registry.get(target.model)
        check_distinct(source_model, target.model)
        record = await self._store.get(source_model, name)
        mapping = await self._usable_mapping(source_model, target.model, mapping_id, method)
        # The write expects the version seen here, so a persona written to the target meanwhile
        # fails the job (version_conflict), never silently replaced.
        expected = None if target.replace else await self._expected_target(name, source_model, target)

        # Arithmetic on stored vectors is carried now, so that what it cannot map is refused now (4xx).
        arithmetic = (
            None
            if drives_models(method)
            else await self._carry(record, source_model, target.model, mapping, method, lambda _: None)
        )

        async def work(progress: Callable[[float], None]) -> dict[str, Any]:
            carried = arithmetic or await self._carry(
                record, source_model, target.model, mapping, method, progress
            )
            info = await self._store_carried(record, source_model, target, mapping, method, carried, expected)
            return {"persona": info.to_dict(), **await self._source_now(record.info, source_model)}

        # A method that drives both models generates and reads for minutes: it takes its turn on them
        # among the other jobs; arithmetic holds no model.
        models = (source_model, target.model) if drives_models(method) else ()
        return self._jobs.submit("map", work, models=models)

    async def _source_now(self, mapped: PersonaInfo, source_model: str) -> dict[str, Any]:
        """Whether the source persona is still the version that was carried."""
        try:
            now: int | None = (await self._store.get(source_model, mapped.name)).info.version
        except PersonaNotFound:
            now = None
        if now == mapped.version:
            return {"source_version": mapped.version, "source_updated": False, "warning": None}
        what = "deleted" if now is None else f"updated to version {now}"
        return {
            "source_version": mapped.version,
            "source_updated": True,
            "warning": f"persona '{mapped.name}' on '{source_model}' was {what} while it was mapped: the "
            f"mapped persona carries version {mapped.version}; map it again to carry the new one",
        }

    async def _store_carried(
        self,
        record: PersonaRecord,
        source_model: str,
        target: MapTarget,
        mapping: MappingRecord | None,
        method: MappingMethod,
        carried: CarriedPersona,
        expected: int | None,
    ) -> PersonaInfo:
        name = record.info.name
        calibration = carried.provenance()
        return await self._admin.put(
            name=target.name,
            model=target.model,
            layers={block: vector.tolist() for block, vector in carried.vectors.items()},
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
        mapping = await self._mapping_for(source_model, target_model, map_kind(method), mapping_id)
        if mapping is None and method in LEARNED_METHODS:
            raise RequestRejected(
                f"no {method.value} mapping from '{source_model}' to '{target_model}': fit one with "
                "POST /admin/mappings first",
                param="mapping_id",
            )
        return mapping

    async def _carry(
        self,
        record: PersonaRecord,
        source_model: str,
        target_model: str,
        mapping: MappingRecord | None,
        method: MappingMethod,
        progress: Callable[[float], None],
    ) -> CarriedPersona:
        """The persona carried to the target model by ``method`` (``carry_persona``)."""
        info = record.info
        concepts = (
            await self._concept_pairs(info.name, source_model, target_model)
            if method is MappingMethod.CONCEPT
            else []
        )
        return await carry_persona(
            method,
            SourcePersona(record.vectors, info.default_strength, info.default_positions),
            self._registry.get(source_model),
            self._registry.get(target_model),
            generation=self._generation,
            fitted=None if mapping is None else fitted_map(mapping),
            concepts=concepts,
            progress=lambda fraction: progress(0.98 * fraction),  # the write is the last step
        )

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
            if info.name == name or other is None:
                continue
            if "mapped" in (info.provenance.get("kind"), other.provenance.get("kind")):
                continue  # a pair one side of which was carried from the other teaches nothing new
            source = await self._store.get(source_model, info.name)
            target = await self._store.get(target_model, info.name)
            pairs.append((source.vectors, target.vectors))
        return pairs
