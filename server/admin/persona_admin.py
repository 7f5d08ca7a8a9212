"""Operator work on personas: validated uploads, reads with vectors, deletes, listings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from persona_store.base import PersonaStore
from persona_store.errors import PersonaNotFound
from persona_store.history import restore_version
from persona_store.records import PersonaDraft, PersonaInfo, is_valid_persona_name
from server.serving.errors import RequestRejected
from server.serving.model_registry import ModelRegistry
from server.steering.errors import SteeringError
from server.steering.plan import Positions

# Engines add strength * vector in float32: a value that overflows there breaks every request.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def largest_value(max_strength: float) -> float:
    """The largest magnitude a stored vector may hold: scaled by the largest strength it stays
    finite in float32, rounding to float32 first included (/openapi.json states it as the bound)."""
    return _FLOAT32_MAX / max_strength / (1 + 2**-20)


def check_scaled_range(layer: int, values: np.ndarray, max_strength: float) -> None:
    """SteeringError unless ``max_strength * values`` stays finite in float32, so that the persona
    serves every strength a request may ask for. ``values`` are the request's (float64): the bound
    is the same number whatever float32 rounds them to."""
    peak = float(np.abs(values).max(initial=0.0))
    if peak > largest_value(max_strength):
        raise SteeringError(
            f"the vector for layer {layer} holds values up to {peak:.3g} in magnitude, which overflow "
            f"float32 once scaled by the largest allowed strength, {max_strength:g}",
            param=f"layers.{layer}",
        )


class PersonaAdmin:
    def __init__(self, registry: ModelRegistry, store: PersonaStore, max_strength: float) -> None:
        self._registry = registry
        self._store = store
        self._max_strength = max_strength

    def check_name(self, name: str) -> None:
        if not is_valid_persona_name(name):
            raise SteeringError(
                f"persona name '{name}' must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$", param="name"
            )

    async def put(
        self,
        name: str,
        model: str,
        layers: Mapping[int, Sequence[float]],
        default_strength: float,
        description: str,
        expected_version: int | None = None,
        provenance: dict[str, Any] | None = None,
        default_positions: str = "all",
    ) -> PersonaInfo:
        """Validate everything against the served model before anything is written."""
        self.check_name(name)
        info = self._registry.get(model).info
        limit = self._max_strength
        if not math.isfinite(default_strength) or abs(default_strength) > limit:
            raise RequestRejected(
                f"default_strength {default_strength} is outside [-{limit}, {limit}]",
                param="default_strength",
            )
        vectors: dict[int, np.ndarray] = {}
        for layer, values in layers.items():
            if layer not in info.steerable_layers:
                raise SteeringError(
                    f"layer {layer} is outside model '{model}': expected a block index in "
                    f"{info.steerable_layers[0]}..{info.steerable_layers[-1]}, got {layer}"
                    f"{info.why_unsteerable(layer)}",
                    param=f"layers.{layer}",
                )
            if len(values) != info.hidden_size:
                raise SteeringError(
                    f"the vector for layer {layer} has {len(values)} values; model '{model}' "
                    f"expects its hidden size, {info.hidden_size}",
                    param=f"layers.{layer}",
                )
            vector = np.asarray(values, dtype=np.float32)
            if not np.isfinite(vector).all():  # finite as float64 may still overflow float32
                raise SteeringError(
                    f"the vector for layer {layer} holds values that are not finite in float32",
                    param=f"layers.{layer}",
                )
            check_scaled_range(layer, np.asarray(values, dtype=np.float64), limit)
            vectors[layer] = vector
        draft = PersonaDraft(
            model=model,
            name=name,
            vectors=vectors,
            default_strength=default_strength,
            description=description,
            provenance=provenance or {"kind": "uploaded"},
            default_positions=Positions(default_positions).value,
        )
        return await self._store.put(draft, expected_version=expected_version)

    async def get(self, name: str, model: str) -> dict[str, Any]:
        self.check_name(name)
        record = await self._store.get(model, name)
        body = record.info.to_dict()
        body["layers"] = {str(layer): vector.tolist() for layer, vector in record.vectors.items()}
        return body

    async def delete(self, name: str, model: str, expected_version: int | None = None) -> None:
        self.check_name(name)
        await self._store.delete(model, name, expected_version=expected_version)

    async def versions(self, name: str, model: str) -> list[PersonaInfo]:
        self.check_name(name)
        kept = await self._store.versions(model, name)
        if not kept:
            raise PersonaNotFound(model, name)
        return kept

    async def restore(
        self, name: str, model: str, version: int, expected_version: int | None = None
    ) -> PersonaInfo:
        self.check_name(name)
        self._registry.get(model)
        return await restore_version(self._store, model, name, version, expected_version)

    async def list(self, model: str | None) -> list[PersonaInfo]:
        if model is not None:
            self._registry.get(model)
        return await self._store.list(model)
