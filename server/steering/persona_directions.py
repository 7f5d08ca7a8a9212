"""Persona vectors from contrastive activations (Chen et al. 2025, "Persona Vectors").

Given, for many answers, the mean residual activation over the answer's tokens at every decoder
block, once for answers written under the positive system prompts and once under the negative ones,
the persona vector of block L is the difference of the two means. Each block is also scored by how
well the projection on its vector separates positive from negative answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerReport:
    layer: int
    norm: float  # of the persona vector
    separation: float  # Cohen's d of the projections of positive vs negative answers on the vector
    accuracy: float  # share of answers on the right side of the midpoint between the two means

    def to_dict(self) -> dict[str, float | int]:
        return {
            "layer": self.layer,
            "norm": self.norm,
            "separation": self.separation,
            "accuracy": self.accuracy,
        }


@dataclass(frozen=True)
class PersonaDirections:
    vectors: dict[int, np.ndarray]  # block index -> float32 [hidden]
    reports: tuple[LayerReport, ...]
    recommended_layer: int


def _layer_report(layer: int, positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, LayerReport]:
    direction = positive.mean(axis=0) - negative.mean(axis=0)
    norm = float(np.linalg.norm(direction))
    unit = direction / norm if norm > 0 else direction
    pos, neg = positive @ unit, negative @ unit
    pooled = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2) if min(len(pos), len(neg)) > 1 else 0.0
    separation = float((pos.mean() - neg.mean()) / pooled) if pooled > 0 else 0.0
    midpoint = (pos.mean() + neg.mean()) / 2
    accuracy = float((np.sum(pos > midpoint) + np.sum(neg <= midpoint)) / (len(pos) + len(neg)))
    return direction.astype(np.float32), LayerReport(layer, norm, separation, accuracy)


def persona_directions(positive: np.ndarray, negative: np.ndarray) -> PersonaDirections:
    """``positive`` [n, layers, hidden] and ``negative`` [m, layers, hidden] mean response activations.

    The recommended layer is the best-separating block, leaving out the last one when there are more:
    the last block feeds the unembedding directly, so steering it biases words more than it shifts a
    persona.
    """
    if positive.ndim != 3 or positive.shape[1:] != negative.shape[1:]:
        raise ValueError(f"activation shapes differ: {positive.shape} vs {negative.shape}")
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("extraction needs answers under both the positive and the negative prompts")
    vectors, reports = {}, []
    for layer in range(positive.shape[1]):
        vectors[layer], report = _layer_report(layer, positive[:, layer], negative[:, layer])
        reports.append(report)
    candidates = reports[:-1] if len(reports) > 1 else reports
    best = max(candidates, key=lambda report: report.separation)
    return PersonaDirections(vectors=vectors, reports=tuple(reports), recommended_layer=best.layer)
