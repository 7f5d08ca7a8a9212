"""Operator work on mappings: fit a map between two served models (a job), carry a persona across.

A fit reads the same neutral texts through both models (block outputs at the last token), fits a
ridge map per source block (lambda by cross-validation) and an orthogonal Procrustes map beside it,
and stores both with their diagnostics and each model's typical residual norm per block (used to
calibrate strengths). Mapping a persona applies one method per block and stores the result for the
target model with its provenance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from persona_store.base import PersonaStore
from persona_store.mappings import MappingDraft, MappingInfo, is_valid_mapping_id
from persona_store.records import PersonaInfo, PersonaRecord
from server.demo.corpus import neutral_texts
from server.serving.background import Job, JobRegistry
from server.serving.errors import RequestRejected
from server.serving.models import ModelRegistry
from server.serving.persona_admin import PersonaAdmin
from server.steering.errors import SteeringError
from server.steering.mapping import (
    MappingError,
    MappingMethod,
    calibrate,
    concept_adapter,
    corresponding_layer,
    fit_ridge,
    interpolate,
    procrustes,
    random_orthogonal,
    zero_pad_or_truncate,
)

REDUCTIONS = {"last": 0, "mean": 1}  # index into text_activations' second axis
MIN_TEXTS = 16
MAX_TEXTS = 20_000
MAX_DEFAULT_BLOCKS = 8  # a default map covers at most this many source blocks (58 MB each at 7B size)


def default_source_blocks(num_blocks: int) -> list[int]:
    """Every block of a small model; of a larger one, blocks spread over the middle of the stack,
    where persona vectors live."""
    if num_blocks <= MAX_DEFAULT_BLOCKS:
        return list(range(num_blocks))
    depths = np.linspace(0.25, 0.75, MAX_DEFAULT_BLOCKS)
    return sorted({round(d * (num_blocks - 1)) for d in depths})


class PersonaMapping:
    def __init__(
        self, registry: ModelRegistry, store: PersonaStore, admin: PersonaAdmin, jobs: JobRegistry
    ) -> None:
        self._registry = registry
        self._store = store
        self._admin = admin
        self._jobs = jobs

    def _pair(self, source_model: str, target_model: str) -> tuple[Any, Any]:
        source, target = self._registry.get(source_model), self._registry.get(target_model)
        if source_model == target_model:
            raise RequestRejected("source_model and target_model are the same model", param="target_model")
        return source, target

    def start_fit(
        self,
        source_model: str,
        target_model: str,
        layers: dict[int, int] | None,
        texts: list[str] | None,
        lambdas: list[float] | None,
        folds: int | None,
        reduce: str = "mean",
    ) -> Job:
        """Check everything that can be checked now (errors answer 4xx), then fit in the background."""
        source, target = self._pair(source_model, target_model)
        source_blocks, target_blocks = source.info.num_layers, target.info.num_layers
        layer_map = layers or {
            block: corresponding_layer(block, source_blocks, target_blocks)
            for block in default_source_blocks(source_blocks)
        }
        for source_block, target_block in layer_map.items():
            if not 0 <= source_block < source_blocks:
                raise SteeringError(
                    f"source block {source_block} is outside '{source_model}' (0..{source_blocks - 1})"
                )
            if not 0 <= target_block < target_blocks:
                raise SteeringError(
                    f"target block {target_block} is outside '{target_model}' (0..{target_blocks - 1})"
                )
        corpus = texts if texts is not None else neutral_texts()
        folds = folds or 5
        if len(corpus) < max(MIN_TEXTS, 2 * folds):
            raise RequestRejected(
                f"{len(corpus)} texts are too few to fit and cross-validate a map: give at least "
                f"{max(MIN_TEXTS, 2 * folds)}",
                param="texts",
            )
        if len(corpus) > MAX_TEXTS:
            raise RequestRejected(f"at most {MAX_TEXTS} texts", param="texts")

        async def work(progress: Callable[[float], None]) -> dict[str, Any]:
            xs = await source.text_activations(corpus, lambda f: progress(0.4 * f))
            ys = await target.text_activations(corpus, lambda f: progress(0.4 + 0.4 * f))
            return await self._fit_and_store(
                source_model, target_model, layer_map, xs, ys, lambdas, folds, reduce
            )

        return self._jobs.submit("mapping", work)

    async def _fit_and_store(
        self,
        source_model: str,
        target_model: str,
        layer_map: dict[int, int],
        xs: np.ndarray,
        ys: np.ndarray,
        lambdas: list[float] | None,
        folds: int,
        reduce: str,
    ) -> dict[str, Any]:
        # Fit on each text's mean block output (persona vectors are means over answer tokens) or its
        # last token; calibrate with last-token norms, the typical norm of one position's residual.
        position = REDUCTIONS[reduce]

        def fit_all() -> tuple[dict[int, Any], dict[int, np.ndarray]]:
            ridge, orthogonal = {}, {}
            for source_block, target_block in layer_map.items():
                x, y = xs[:, position, source_block], ys[:, position, target_block]
                ridge[source_block] = fit_ridge(x, y, lambdas=lambdas, folds=folds)
                orthogonal[source_block] = procrustes(x, y)
            return ridge, orthogonal

        try:
            ridge, orthogonal = await asyncio.to_thread(fit_all)  # CPU-bound: keep the event loop free
        except MappingError as exc:
            raise RequestRejected(str(exc)) from exc
        norms = {
            "source_norms": {str(b): float(np.linalg.norm(xs[:, 0, b], axis=1).mean()) for b in layer_map},
            "target_norms": {
                str(b): float(np.linalg.norm(ys[:, 0, b], axis=1).mean()) for b in layer_map.values()
            },
            "texts": int(xs.shape[0]),
            "reduce": reduce,
        }
        diagnostics = {str(block): fit.diagnostics() for block, fit in ridge.items()}
        ridge_info = await self._store.put_mapping(
            MappingDraft(
                source_model,
                target_model,
                {b: f.weights for b, f in ridge.items()},
                layer_map,
                {"method": "ridge", "blocks": diagnostics, **norms},
            )
        )
        procrustes_info = await self._store.put_mapping(
            MappingDraft(
                source_model,
                target_model,
                orthogonal,
                layer_map,
                {"method": "procrustes", "ridge_mapping": ridge_info.id, **norms},
            )
        )
        return {
            "mapping_id": ridge_info.id,
            "procrustes_mapping_id": procrustes_info.id,
            "layers": {str(k): v for k, v in layer_map.items()},
            "diagnostics": diagnostics,
        }

    async def list(self) -> list[MappingInfo]:
        return await self._store.list_mappings()

    async def get(self, mapping_id: str) -> MappingInfo:
        self._check_id(mapping_id)
        return (await self._store.get_mapping(mapping_id)).info

    async def delete(self, mapping_id: str) -> None:
        self._check_id(mapping_id)
        await self._store.delete_mapping(mapping_id)

    @staticmethod
    def _check_id(mapping_id: str) -> None:
        if not is_valid_mapping_id(mapping_id):
            raise RequestRejected(
                f"'{mapping_id}' is not a mapping id (map-<12 hex digits>)", param="mapping_id"
            )

    async def _mapping_for(
        self, source_model: str, target_model: str, method: str, mapping_id: str | None
    ) -> Any:
        if mapping_id is not None:
            self._check_id(mapping_id)
            record = await self._store.get_mapping(mapping_id)
            info = record.info
            if (info.source_model, info.target_model) != (source_model, target_model):
                raise SteeringError(
                    f"mapping {mapping_id} maps '{info.source_model}' to '{info.target_model}', "
                    f"not '{source_model}' to '{target_model}'"
                )
            if info.metadata.get("method") != method:
                raise SteeringError(
                    f"mapping {mapping_id} is a {info.metadata.get('method')} map, not {method}"
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

    async def map_persona(
        self, name: str, source_model: str, target_model: str, mapping_id: str | None, method: MappingMethod
    ) -> PersonaInfo:
        self._admin.check_name(name)
        source_info = self._registry.get(source_model).info
        target_info = self._registry.get(target_model).info
        if source_model == target_model:
            raise RequestRejected("source_model and target_model are the same model", param="target_model")
        record = await self._store.get(source_model, name)
        wanted = method.value if method in (MappingMethod.RIDGE, MappingMethod.PROCRUSTES) else "ridge"
        mapping = await self._mapping_for(source_model, target_model, wanted, mapping_id)
        if mapping is None and method in (MappingMethod.RIDGE, MappingMethod.PROCRUSTES):
            raise RequestRejected(
                f"no {method.value} mapping from '{source_model}' to '{target_model}': fit one with "
                "POST /admin/mappings first",
                param="mapping_id",
            )
        # The concept adapter learns from the other personas native on both models: read them once.
        concepts = (
            await self._concept_records(name, source_model, target_model)
            if method is MappingMethod.CONCEPT
            else []
        )
        layers: dict[int, np.ndarray] = {}
        for block, vector in record.vectors.items():
            if mapping is not None and block in mapping.matrices:
                target_block = mapping.info.layer_map[block]
            elif method in (MappingMethod.RIDGE, MappingMethod.PROCRUSTES):
                continue
            else:
                target_block = corresponding_layer(block, source_info.num_layers, target_info.num_layers)
            mapped = self._apply(method, vector, block, target_block, mapping, concepts, source_model,
                                 target_model, target_info.hidden_size)  # fmt: skip
            if mapping is not None:
                norms = mapping.info.metadata
                mapped = calibrate(mapped, vector, norms["source_norms"].get(str(block), 0.0),
                                   norms["target_norms"].get(str(target_block), 0.0))  # fmt: skip
            layers[target_block] = layers.get(target_block, 0) + mapped
        if not layers:
            covered = sorted(mapping.matrices) if mapping is not None else []
            raise SteeringError(
                f"persona '{name}' has blocks {sorted(record.vectors)}, the mapping covers blocks {covered}"
            )
        if 0 in layers and 0 not in target_info.steerable_layers:
            layers.pop(0)  # a GGUF target cannot steer block 0
        return await self._admin.put(
            name=name,
            model=target_model,
            layers={block: vector.tolist() for block, vector in layers.items()},
            default_strength=record.info.default_strength,
            description=record.info.description,
            default_positions=record.info.default_positions,
            provenance={
                "kind": "mapped",
                "source_model": source_model,
                "source_version": record.info.version,
                "method": method.value,
                "mapping_id": None if mapping is None else mapping.info.id,
            },
        )

    def _apply(
        self,
        method: MappingMethod,
        vector: np.ndarray,
        block: int,
        target_block: int,
        mapping: Any,
        concepts: list[tuple[PersonaRecord, PersonaRecord]],
        source_model: str,
        target_model: str,
        width: int,
    ) -> np.ndarray:
        if method in (MappingMethod.RIDGE, MappingMethod.PROCRUSTES):
            return (vector @ mapping.matrices[block]).astype(np.float32)
        if method is MappingMethod.ZERO_PAD:
            return zero_pad_or_truncate(vector, width)
        if method is MappingMethod.INTERPOLATE:
            return interpolate(vector, width)
        if method is MappingMethod.RANDOM:
            return vector @ random_orthogonal(vector.shape[0], width, seed=block)
        # (v_A, v_B) of each concept persona at these blocks (the target's nearest block if it has another).
        pairs = [
            (source.vectors[block], target.vectors[min(target.vectors, key=lambda b: abs(b - target_block))])
            for source, target in concepts
            if block in source.vectors
        ]
        if not pairs:
            raise SteeringError(
                f"the concept adapter needs other personas that exist on both '{source_model}' (block "
                f"{block}) and '{target_model}' (block {target_block}); there are none"
            )
        a = np.stack([p[0] for p in pairs])
        b = np.stack([p[1] for p in pairs])
        return (vector @ concept_adapter(a, b)).astype(np.float32)

    async def _concept_records(
        self, name: str, source_model: str, target_model: str
    ) -> list[tuple[PersonaRecord, PersonaRecord]]:
        """Every other persona that exists natively (not mapped) on both models, both records."""
        targets = {info.name: info for info in await self._store.list(target_model)}
        records = []
        for info in await self._store.list(source_model):
            other = targets.get(info.name)
            if info.name == name or other is None or other.provenance.get("kind") == "mapped":
                continue
            records.append(
                (
                    await self._store.get(source_model, info.name),
                    await self._store.get(target_model, info.name),
                )
            )
        return records
