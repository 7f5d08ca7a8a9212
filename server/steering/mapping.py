"""Carrying a persona vector from a source model to a target model with a linear map.

Both models read the same neutral texts; their block outputs form paired activations X (n x p,
source) and Y (n x q, target). A map W (p x q) fitted on them carries a direction: ``v_B = v_A @ W``.

Ridge regression on centered activations, ``W = (X^T X + lambda I)^-1 X^T Y``, with lambda chosen by
K-fold cross-validation. All of it comes from ONE symmetric eigendecomposition of the full Gram
matrix ``G = X^T X = Q diag(e) Q^T`` (float64):
- for any lambda, ``W = Q diag(1 / (e + lambda)) Q^T X^T Y``;
- the held-out predictions of fold f follow from the full-data fit by the hat-matrix identity
  ``Y_hat_f = (I - H_ff)^-1 (X_f W - H_ff Y_f)``, with ``H_ff = X_f (G + lambda I)^-1 X_f^T``: exactly
  the predictions of a model fitted without fold f, at the cost of an n_f x n_f solve;
- the CV error is measured on a random sketch of the target columns (``Y S``, S Gaussian with
  ``E[S S^T] = I``): ridge is column-separable, so the sketched error is an unbiased estimate of the
  full one, at a fraction of the cost when the target is wide.
(Centering uses the full-data means; a fold's own means would differ by O(1/n).)

Rivals, for honest comparison: orthogonal Procrustes (semi-orthogonal W from the SVD of X^T Y, any
widths), the concept-pair adapter (ridge on a handful of known (v_A, v_B) concept vector pairs),
zero-pad/truncate, linear interpolation over coordinates, and a random orthogonal projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

DEFAULT_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative to mean(e): scale-free


class MappingMethod(StrEnum):
    RIDGE = "ridge"
    PROCRUSTES = "procrustes"
    CONCEPT = "concept"
    ZERO_PAD = "zero_pad"
    INTERPOLATE = "interpolate"
    RANDOM = "random"
    # Through text: the source writes with and without the persona, the target reads both
    # (transfer/generated.py); it needs both models served, not a fitted map.
    GENERATED = "generated"


# The method a map request uses when it names none.
DEFAULT_METHOD = MappingMethod.GENERATED


class MappingError(ValueError):
    """Inputs a map cannot be fitted or applied on (too few pairs, mismatched shapes)."""


@dataclass(frozen=True)
class RidgeFit:
    weights: np.ndarray  # (p, q) float32: v_B = v_A @ weights
    chosen_lambda: float  # absolute (the relative one times mean eigenvalue)
    lambdas: tuple[float, ...]  # absolute values tried
    cv_errors: tuple[float, ...]  # held-out mean squared error per lambda (sketched estimate)
    cv_r2: tuple[float, ...]  # held-out R^2 per lambda
    folds: int
    singular_values: np.ndarray = field(repr=False)  # of weights, descending

    @property
    def r2(self) -> float:
        return self.cv_r2[self.lambdas.index(self.chosen_lambda)]

    @property
    def effective_rank(self) -> float:
        """exp(entropy) of the normalised singular values: how many directions W really uses."""
        return effective_rank(self.singular_values)

    def diagnostics(self) -> dict[str, object]:
        return {
            "method": "ridge",
            "lambda": self.chosen_lambda,
            "lambdas": list(self.lambdas),
            "cv_mse": list(self.cv_errors),
            "cv_r2": list(self.cv_r2),
            "r2": self.r2,
            "folds": self.folds,
            "effective_rank": self.effective_rank,
            "singular_values": [float(s) for s in self.singular_values[:64]],
        }


def effective_rank(singular_values: np.ndarray) -> float:
    weights = np.asarray(singular_values, dtype=np.float64)
    weights = weights[weights > 0]
    if weights.size == 0:
        return 0.0
    p = weights / weights.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def _folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def fit_ridge(
    source: np.ndarray,
    target: np.ndarray,
    lambdas: Sequence[float] | None = None,
    folds: int = 5,
    sketch: int = 512,
    seed: int = 0,
) -> RidgeFit:
    """Ridge map from ``source`` (n x p) to ``target`` (n x q) activations, lambda by K-fold CV.

    ``lambdas`` are relative to the mean eigenvalue of the centered Gram matrix (default
    ``DEFAULT_LAMBDAS``), so that one grid suits models of any scale.
    """
    x = torch.as_tensor(np.asarray(source), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(target), dtype=torch.float64)
    n = x.shape[0]
    if x.ndim != 2 or y.ndim != 2 or y.shape[0] != n:
        raise MappingError(f"expected paired 2-D activations, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 2 <= folds <= n:
        raise MappingError(f"cross-validation needs 2 <= folds <= pairs ({n}), got {folds}")
    if n < 2 * folds:
        raise MappingError(f"{n} pairs are too few for {folds}-fold cross-validation")
    rng = np.random.default_rng(seed)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    eigenvalues, basis = torch.linalg.eigh(x.T @ x)
    eigenvalues = eigenvalues.clamp_min(0.0)
    scale = float(eigenvalues.mean()) or 1.0
    relative = tuple(float(v) for v in (lambdas or DEFAULT_LAMBDAS))
    if any(not (math.isfinite(v) and v > 0) for v in relative):
        raise MappingError(f"lambdas must be positive and finite, got {list(relative)}")
    absolute = tuple(v * scale for v in relative)

    # CV on a sketch of the target columns (exact when the target is narrower than the sketch).
    if y.shape[1] > sketch:
        projection = torch.as_tensor(rng.standard_normal((y.shape[1], sketch)) / math.sqrt(sketch))
        y_cv = y @ projection
    else:
        y_cv = y
    errors, r2s = _cv_errors(x @ basis, y_cv, eigenvalues, absolute, _folds(n, folds, rng), y.shape[1])
    chosen = absolute[int(np.argmin(errors))]
    weights, singular_values = _ridge_weights(x, y, eigenvalues, basis, chosen)
    return RidgeFit(
        weights=weights,
        chosen_lambda=chosen,
        lambdas=absolute,
        cv_errors=tuple(errors),
        cv_r2=tuple(r2s),
        folds=folds,
        singular_values=singular_values,
    )


def _cv_errors(
    z: torch.Tensor,
    y_cv: torch.Tensor,
    eigenvalues: torch.Tensor,
    lambdas: Sequence[float],
    parts: list[np.ndarray],
    width: int,
) -> tuple[list[float], list[float]]:
    """Held-out MSE and R^2 per lambda from the full-data fit (hat-matrix identity per fold).

    ``z`` holds the source activations in the Gram eigenbasis; ``width`` is the target's true width
    (the sketch keeps the sum of squares, not the width)."""
    n = z.shape[0]
    zt_y = z.T @ y_cv
    total = float((y_cv**2).sum())
    errors, r2s = [], []
    for value in lambdas:
        inverse = 1.0 / (eigenvalues + value)
        predictions = z @ (inverse[:, None] * zt_y)  # full-data fit, every row
        squared = 0.0
        for rows in parts:
            zf = z[rows]
            hat = (zf * inverse) @ zf.T
            held_out = torch.linalg.solve(
                torch.eye(len(rows), dtype=torch.float64) - hat, predictions[rows] - hat @ y_cv[rows]
            )
            squared += float(((y_cv[rows] - held_out) ** 2).sum())
        errors.append(squared / (n * width))
        r2s.append(1.0 - squared / total if total > 0 else 0.0)
    return errors, r2s


def _ridge_weights(
    x: torch.Tensor, y: torch.Tensor, eigenvalues: torch.Tensor, basis: torch.Tensor, chosen: float
) -> tuple[np.ndarray, np.ndarray]:
    """The final map at the chosen lambda (float32) and its singular values, descending."""
    # W = Q D B with B = Q^T X^T Y; Q is orthogonal, so W's singular values are those of D B, read
    # from the eigenvalues of the p x p matrix (D B)(D B)^T instead of an SVD of the p x q W.
    scaled = (1.0 / (eigenvalues + chosen))[:, None] * (basis.T @ (x.T @ y))
    weights = basis @ scaled
    gram_values = torch.linalg.eigvalsh(
        scaled @ scaled.T if scaled.shape[0] <= scaled.shape[1] else scaled.T @ scaled
    )
    return weights.float().numpy(), gram_values.clamp_min(0.0).sqrt().flip(0).numpy()


def plain_ridge(source: np.ndarray, target: np.ndarray, absolute_lambda: float) -> np.ndarray:
    """One direct solve of the ridge system (Cholesky), the reference the CV is timed against."""
    x = torch.as_tensor(np.asarray(source), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(target), dtype=torch.float64)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    gram = x.T @ x + absolute_lambda * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.cholesky_solve(x.T @ y, torch.linalg.cholesky(gram)).float().numpy()


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal Procrustes on centered activations: the semi-orthogonal W (p x q) closest to
    mapping X onto Y (rows orthonormal if p <= q, columns if p > q: the shared subspace)."""
    x = np.asarray(source, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
    return (u @ vt).astype(np.float32)


def concept_adapter(
    source_vectors: np.ndarray, target_vectors: np.ndarray, ridge: float = 1e-2
) -> np.ndarray:
    """W fitted on k known concept pairs (rows of each matrix): min ||A W - B||^2 + ridge ||W||^2,
    solved in the k-dimensional dual since k is small."""
    a = np.asarray(source_vectors, dtype=np.float64)
    b = np.asarray(target_vectors, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or a.shape[0] < 1:
        raise MappingError(f"concept pairs must be k x p and k x q with k >= 1, got {a.shape}, {b.shape}")
    kernel = a @ a.T
    scale = float(np.trace(kernel)) / a.shape[0] or 1.0
    return (a.T @ np.linalg.solve(kernel + ridge * scale * np.eye(a.shape[0]), b)).astype(np.float32)


def zero_pad_or_truncate(vector: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros(width, dtype=np.float32)
    out[: min(width, vector.shape[0])] = vector[:width]
    return out


def interpolate(vector: np.ndarray, width: int) -> np.ndarray:
    """Linear interpolation of the coordinates onto ``width`` evenly spaced positions."""
    source_positions = np.linspace(0.0, 1.0, vector.shape[0])
    return np.interp(np.linspace(0.0, 1.0, width), source_positions, vector).astype(np.float32)


def random_orthogonal(source_width: int, target_width: int, seed: int = 0) -> np.ndarray:
    """A random semi-orthogonal map (p x q): what a map that knows nothing does to a vector's norm."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(
        rng.standard_normal((max(source_width, target_width), min(source_width, target_width)))
    )
    return (q if source_width >= target_width else q.T).astype(np.float32)[:source_width, :target_width]


def corresponding_layer(layer: int, source_blocks: int, target_blocks: int) -> int:
    """Block of the target at the same relative depth: round(l * (L_B - 1) / (L_A - 1))."""
    if source_blocks < 2:
        return 0
    return round(layer * (target_blocks - 1) / (source_blocks - 1))


def calibrate(
    mapped: np.ndarray, source_vector: np.ndarray, source_norm: float, target_norm: float
) -> np.ndarray:
    """Rescale ``mapped`` so that its norm relative to the target's typical residual norm at that
    block equals the source vector's norm relative to the source's: one strength then means about
    the same push on both models."""
    length = float(np.linalg.norm(mapped))
    if length == 0 or source_norm <= 0 or target_norm <= 0:
        return mapped.astype(np.float32)
    wanted = float(np.linalg.norm(source_vector)) / source_norm * target_norm
    return (mapped * (wanted / length)).astype(np.float32)
