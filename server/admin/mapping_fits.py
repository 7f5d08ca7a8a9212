"""Operator work on maps between models: fit one (a background job), list, read and delete them.

A fit reads the same texts through both models, fits a ridge map per source block (lambda by
cross-validation) and an orthogonal Procrustes map beside it (``transfer.maps.fit_maps``),
and stores both with their diagnostics, the corpus they were fitted on and each model's typical
residual norm per block (used to calibrate strengths when a persona is mapped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from persona_store.base import PersonaStore
from persona_store.mappings import MappingDraft, MappingInfo, is_valid_mapping_id
from server.admin.fitting_corpus import FittingCorpus
from server.admin.jobs import Job, JobRegistry
from server.engine.base import ModelInfo
from server.serving.errors import RequestRejected
from server.serving.model_registry import ModelRegistry
from server.steering.errors import SteeringError
from server.steering.mapping import MappingError, corresponding_layer
from server.transfer.maps import FittedMap, FittedMaps, fit_maps

MIN_TEXTS = 16
MAX_TEXTS = 20_000
MAX_DEFAULT_BLOCKS = 8  # a default map covers at most this many source blocks (58 MB each at 7B size)
REQUEST_CORPUS = "request"  # the corpus name of a fit whose texts came with the request


def default_source_blocks(num_blocks: int) -> list[int]:
    """Every block of a small model; of a larger one, blocks spread over the middle of the stack,
    where persona vectors live."""
    if num_blocks <= MAX_DEFAULT_BLOCKS:
        return list(range(num_blocks))
    depths = np.linspace(0.25, 0.75, MAX_DEFAULT_BLOCKS)
    return sorted({round(d * (num_blocks - 1)) for d in depths})


def check_mapping_id(mapping_id: str) -> None:
    if not is_valid_mapping_id(mapping_id):
        raise RequestRejected(f"'{mapping_id}' is not a mapping id (map-<12 hex digits>)", param="mapping_id")


def check_distinct(source_model: str, target_model: str) -> None:
    if source_model == target_model:
        raise RequestRejected("source_model and target_model are the same model", param="target_model")


class MappingFits:
    def __init__(
        self, registry: ModelRegistry, store: PersonaStore, jobs: JobRegistry, corpus: FittingCorpus
    ) -> None:
        self._registry = registry
        self._store = store
        self._jobs = jobs
        self._corpus = corpus

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
        source, target = self._registry.get(source_model), self._registry.get(target_model)
        check_distinct(source_model, target_model)
        layer_map = _layer_map(layers, source.info, target.info)
        corpus = FittingCorpus(REQUEST_CORPUS, tuple(texts)) if texts is not None else self._corpus
        folds = folds or 5
        self._check_size(corpus.texts, folds)

        async def work(progress: Callable[[float], None]) -> dict[str, Any]:
            xs = await source.text_activations(list(corpus.texts), lambda f: progress(0.4 * f))
            ys = await target.text_activations(list(corpus.texts), lambda f: progress(0.4 + 0.4 * f))
            try:  # CPU-bound: keep the event loop free
                maps = await asyncio.to_thread(fit_maps, xs, ys, layer_map, lambdas, folds, reduce)
            except MappingError as exc:
                raise RequestRejected(str(exc)) from exc
            return await self._store_maps(source_model, target_model, maps, corpus.name, len(xs), reduce)

        return self._jobs.submit("mapping", work, models=[source_model, target_model])

    @staticmethod
    def _check_size(texts: Sequence[str], folds: int) -> None:
        if len(texts) < max(MIN_TEXTS, 2 * folds):
            raise RequestRejected(
                f"{len(texts)} texts are too few to fit and cross-validate a map: give at least "
                f"{max(MIN_TEXTS, 2 * folds)}",
                param="texts",
            )
        if len(texts) > MAX_TEXTS:
            raise RequestRejected(f"at most {MAX_TEXTS} texts", param="texts")

    async def _store_maps(
        self, source_model: str, target_model: str, maps: FittedMaps, corpus: str, texts: int, reduce: str
    ) -> dict[str, Any]:
        fitted = {**_norm_metadata(maps.ridge), "texts": texts, "reduce": reduce, "corpus": corpus}
        diagnostics = {str(block): fit.diagnostics() for block, fit in maps.ridge_fits.items()}

        async def put(fitted_map: FittedMap, metadata: dict[str, Any]) -> MappingInfo:
            metadata = {"method": fitted_map.method, **metadata, **fitted}
            matrices, layer_map = dict(fitted_map.matrices), dict(fitted_map.layer_map)
            draft = MappingDraft(source_model, target_model, matrices, layer_map, metadata)
            return await self._store.put_mapping(draft)

        ridge_info = await put(maps.ridge, {"blocks": diagnostics})
        procrustes_info = await put(maps.procrustes, {"ridge_mapping": ridge_info.id})
        return {
            "mapping_id": ridge_info.id,
            "procrustes_mapping_id": procrustes_info.id,
            "layers": {str(k): v for k, v in maps.ridge.layer_map.items()},
            "corpus": corpus,
            "diagnostics": diagnostics,
        }

    async def list(self) -> list[MappingInfo]:
        return await self._store.list_mappings()

    async def get(self, mapping_id: str) -> MappingInfo:
        check_mapping_id(mapping_id)
        return (await self._store.get_mapping(mapping_id)).info

    async def delete(self, mapping_id: str) -> None:
        check_mapping_id(mapping_id)
        await self._store.delete_mapping(mapping_id)


def _layer_map(layers: dict[int, int] | None, source: ModelInfo, target: ModelInfo) -> dict[int, int]:
    """The requested source -> target blocks, checked against both models; by default, the blocks
    at the same relative depth."""
    source_blocks, target_blocks = source.num_layers, target.num_layers
    layer_map = layers or {
        block: corresponding_layer(block, source_blocks, target_blocks)
        for block in default_source_blocks(source_blocks)
    }
    for source_block, target_block in layer_map.items():
        if not 0 <= source_block < source_blocks:
            raise SteeringError(
                f"source block {source_block} is outside '{source.id}' (0..{source_blocks - 1})",
                param="layers",
            )
        if not 0 <= target_block < target_blocks:
            raise SteeringError(
                f"target block {target_block} is outside '{target.id}' (0..{target_blocks - 1})",
                param="layers",
            )
    return layer_map


def _norm_metadata(fitted: FittedMap) -> dict[str, Any]:
    """Norms as stored in a mapping's metadata (JSON: string keys)."""
    return {
        "source_norms": {str(b): n for b, n in fitted.source_norms.items()},
        "target_norms": {str(b): n for b, n in fitted.target_norms.items()},
    }
