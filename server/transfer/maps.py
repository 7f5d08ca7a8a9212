"""The arithmetic of carrying a persona: fit the maps between two models, and carry a persona's
vectors by a method that works on stored vectors (every method but generated, which drives both
models: ``carry.py``). The server's mapping fits (``POST /admin/mappings``) and the evaluation's
transfer table both call ``fit_maps``; every method is chosen in ``carry.carry_persona``.

Rules, whatever the method:
- source block b goes to the fitted map's target block for b when a map is given, else to the
  target block at the same relative depth;
- a learned method (ridge, Procrustes) maps only the blocks its map covers;
- the concept adapter at block b learns from the other personas that have a vector at source
  block b (their target vector at the nearest block); a block with no such persona is left out;
- with a fitted map, each mapped vector is calibrated so that its norm relative to the target's
  typical residual norm equals the source vector's relative norm: the persona's strength keeps its
  meaning across models;
- a block the target cannot steer is dropped; nothing mapped at all is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from server.steering.errors import SteeringError
from server.steering.mapping import (
    MappingError,
    MappingMethod,
    RidgeFit,
    calibrate,
    concept_adapter,
    corresponding_layer,
    fit_ridge,
    interpolate,
    procrustes,
    random_orthogonal,
    zero_pad_or_truncate,
)

LEARNED_METHODS = (MappingMethod.RIDGE, MappingMethod.PROCRUSTES)
# Index into the second axis of a backend's text_activations: one text's last token or its mean.
REDUCTIONS = {"last": 0, "mean": 1}

# One other persona, native on both models: its vectors by block on the source and on the target.
ConceptPair = tuple[Mapping[int, np.ndarray], Mapping[int, np.ndarray]]


@dataclass(frozen=True)
class ModelShape:
    """What mapping needs to know of a model: its depth, width and the blocks it can steer."""

    num_layers: int
    hidden_size: int
    steerable_layers: tuple[int, ...]


@dataclass(frozen=True)
class FittedMap:
    """A linear map between two models, per source block, with each model's typical residual norm."""

    method: str  # "ridge" or "procrustes"
    matrices: Mapping[int, np.ndarray]  # source block -> (source width, target width)
    layer_map: Mapping[int, int]  # source block -> target block
    source_norms: Mapping[int, float]  # mean last-token block-output norm on the fitting texts
    target_norms: Mapping[int, float]  # keyed by target block


@dataclass(frozen=True)
class FittedMaps:
    """The two maps one fit produces from the same paired activations."""

    ridge: FittedMap
    procrustes: FittedMap
    ridge_fits: dict[int, RidgeFit]  # per source block, for the diagnostics

    def for_method(self, method: MappingMethod) -> FittedMap:
        """The map ``method`` goes through (``map_kind``)."""
        return self.procrustes if map_kind(method) == MappingMethod.PROCRUSTES.value else self.ridge


def map_kind(method: MappingMethod) -> str:
    """The kind of fitted map a method goes through: a learned method applies its own; the others
    take target blocks and norm calibration from the ridge fit, when there is one."""
    return method.value if method in LEARNED_METHODS else MappingMethod.RIDGE.value


def fit_maps(
    xs: np.ndarray,
    ys: np.ndarray,
    layer_map: Mapping[int, int],
    lambdas: Sequence[float] | None = None,
    folds: int = 5,
    reduce: str = "mean",
) -> FittedMaps:
    """Fit a ridge map (lambda by cross-validation) and a Procrustes map per source block.

    ``xs`` and ``ys`` are both models' ``text_activations`` on the same texts: [texts, 2, blocks, width].
    The maps are fitted on each text's mean block output (persona vectors are means over answer
    tokens) or its last token; norms are always last-token norms, the typical norm of one position.
    """
    position = REDUCTIONS[reduce]
    ridge_fits, orthogonal = {}, {}
    for source_block, target_block in layer_map.items():
        x, y = xs[:, position, source_block], ys[:, position, target_block]
        ridge_fits[source_block] = fit_ridge(x, y, lambdas=lambdas, folds=folds)
        orthogonal[source_block] = procrustes(x, y)
    source_norms = {b: float(np.linalg.norm(xs[:, 0, b], axis=1).mean()) for b in layer_map}
    target_norms = {b: float(np.linalg.norm(ys[:, 0, b], axis=1).mean()) for b in layer_map.values()}
    ridge = {b: fit.weights for b, fit in ridge_fits.items()}
    return FittedMaps(
        ridge=FittedMap("ridge", ridge, dict(layer_map), source_norms, target_norms),
        procrustes=FittedMap("procrustes", orthogonal, dict(layer_map), source_norms, target_norms),
        ridge_fits=ridge_fits,
    )


def map_persona_vectors(
    method: MappingMethod,
    vectors: Mapping[int, np.ndarray],
    source: ModelShape,
    target: ModelShape,
    fitted: FittedMap | None = None,
    concepts: Sequence[ConceptPair] = (),
) -> dict[int, np.ndarray]:
    """The persona's vectors on the target model: target block -> vector (float32).

    ``fitted`` is the map a learned method applies; for the other methods it is optional and, when
    given, chooses target blocks and calibrates norms. ``concepts`` feed the concept adapter.
    """
    if method is MappingMethod.GENERATED:
        raise MappingError("the generated method carries a persona through text: it needs both models served")
    if method in LEARNED_METHODS and (fitted is None or fitted.method != method.value):
        raise MappingError(f"the {method.value} method needs a fitted {method.value} map")
    layers: dict[int, np.ndarray] = {}
    for block, vector in vectors.items():
        if fitted is not None and block in fitted.matrices:
            target_block = fitted.layer_map[block]
        elif method in LEARNED_METHODS:
            continue  # the map does not cover this block
        else:
            target_block = corresponding_layer(block, source.num_layers, target.num_layers)
        mapped = _map_one(method, vector, block, target_block, target.hidden_size, fitted, concepts)
        if mapped is None:
            continue
        if fitted is not None:
            mapped = calibrate(
                mapped,
                vector,
                fitted.source_norms.get(block, 0.0),
                fitted.target_norms.get(target_block, 0.0),
            )
        layers[target_block] = layers[target_block] + mapped if target_block in layers else mapped
    layers = {block: v for block, v in layers.items() if block in target.steerable_layers}
    if not layers:
        raise SteeringError(_nothing_mapped(method, vectors, fitted))
    return layers


def _map_one(
    method: MappingMethod,
    vector: np.ndarray,
    block: int,
    target_block: int,
    width: int,
    fitted: FittedMap | None,
    concepts: Sequence[ConceptPair],
) -> np.ndarray | None:
    if method in LEARNED_METHODS:
        assert fitted is not None
        return (vector @ fitted.matrices[block]).astype(np.float32)
    if method is MappingMethod.ZERO_PAD:
        return zero_pad_or_truncate(vector, width)
    if method is MappingMethod.INTERPOLATE:
        return interpolate(vector, width)
    if method is MappingMethod.RANDOM:
        return (vector @ random_orthogonal(vector.shape[0], width, seed=block)).astype(np.float32)
    pairs = [
        (source[block], target[min(target, key=lambda b: abs(b - target_block))])
        for source, target in concepts
        if block in source and target
    ]
    if not pairs:
        return None
    adapter = concept_adapter(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    return (vector @ adapter).astype(np.float32)


def _nothing_mapped(
    method: MappingMethod, vectors: Mapping[int, np.ndarray], fitted: FittedMap | None
) -> str:
    blocks = sorted(vectors)
    if method is MappingMethod.CONCEPT:
        return (
            f"the concept adapter needs other personas that exist on both models with a vector at one of "
            f"the persona's blocks {blocks}; there are none"
        )
    if fitted is not None:
        return f"the persona has blocks {blocks}, the mapping covers blocks {sorted(fitted.matrices)}"
    return f"none of the persona's blocks {blocks} maps to a block the target model can steer"
