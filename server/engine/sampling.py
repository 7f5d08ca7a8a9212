"""Next-token choice per row: greedy rows by argmax, sampled rows with their own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.base import SamplingParams


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Choose a token from ``logits`` [vocab] under temperature and nucleus sampling."""
    if params.greedy:
        return int(torch.argmax(logits))
    # float64: a top_p or temperature at the edge of float32 must not empty the distribution.
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` [rows, vocab]."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        greedy[row] if p.greedy else sample_one(logits[row].cpu(), p, generators[row])
        for row, p in enumerate(params)
    ]
