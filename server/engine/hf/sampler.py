"""Next-token choice per row: greedy rows by argmax, sampled rows with their own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.base import SamplingParams


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Choose a token from ``logits`` [vocab] (float32) under temperature and nucleus sampling."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
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
