"""Confidence intervals of a transfer ratio, by a two-stage bootstrap over questions and samples.

Every condition answers the same questions with the same sampling seeds, so the conditions are
paired: one bootstrap draw resamples questions (with replacement), then samples within each drawn
question, and takes the same units from the unsteered, native and mapped answers. The ratio of a
draw is the mapped shift over the native shift; the interval is the 2.5th and 97.5th percentiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _grid(scores: Sequence[float], questions: int) -> np.ndarray:
    grid = np.asarray(scores, dtype=np.float64)
    if grid.size == 0 or grid.size % questions:
        raise ValueError(f"{grid.size} answer scores do not divide into {questions} questions")
    return grid.reshape(questions, -1)


def transfer_interval(
    mapped: Sequence[float],
    unsteered: Sequence[float],
    native: Sequence[float],
    questions: int,
    overshoot_cap: float | None = None,
    draws: int = 2000,
    seed: int = 0,
) -> Interval:
    """The transfer ratio (mapped - unsteered) / (native - unsteered) of per-answer scores laid out
    question by question, with a 95% bootstrap interval; ``overshoot_cap`` clips each ratio (the
    issue's rule counts an overshoot as 1.0). A draw whose native shift is not positive is dropped."""
    grids = np.stack([_grid(mapped, questions), _grid(unsteered, questions), _grid(native, questions)])
    samples = grids.shape[2]
    rng = np.random.default_rng(seed)
    picked_questions = rng.integers(0, questions, size=(draws, questions))
    picked_samples = rng.integers(0, samples, size=(draws, questions, samples))
    # [3, draws, questions, samples] -> the mean of each condition in each draw
    means = grids[:, picked_questions[..., None], picked_samples].mean(axis=(2, 3))
    native_shift = means[2] - means[1]
    usable = native_shift > 0
    ratios = (means[0][usable] - means[1][usable]) / native_shift[usable]
    estimate = _ratio(grids.mean(axis=(1, 2)))
    if overshoot_cap is not None:
        ratios = np.minimum(ratios, overshoot_cap)
        estimate = min(estimate, overshoot_cap)
    if ratios.size == 0:
        return Interval(estimate, float("nan"), float("nan"))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Interval(estimate, float(low), float(high))


def _ratio(means: np.ndarray) -> float:
    native_shift = means[2] - means[1]
    return float((means[0] - means[1]) / native_shift) if native_shift > 0 else float("nan")


def mean_interval(cells: Sequence[Interval]) -> Interval:
    """The mean of independent cells' estimates with a normal 95% interval, each cell's standard
    error read off its own interval (half its width over 1.96); a cell with no estimate or interval
    (no native shift to compare with) is left out."""
    usable = [cell for cell in cells if np.isfinite([cell.estimate, cell.low, cell.high]).all()]
    if not usable:
        return Interval(float("nan"), float("nan"), float("nan"))
    estimates = np.array([cell.estimate for cell in usable])
    errors = np.array([(cell.high - cell.low) / (2 * 1.96) for cell in usable])
    half = 1.96 * float(np.sqrt(np.sum(errors**2))) / len(usable)
    mean = float(estimates.mean())
    return Interval(mean, mean - half, mean + half)
