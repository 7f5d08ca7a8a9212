"""Measures of steered text that need no model: repetition and diversity."""

from __future__ import annotations

import math
from collections import Counter


def distinct_ngram_ratio(tokens: list[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of one text (1.0: no repetition)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def collapsed(tokens: list[str], n: int = 3, repeats: int = 3) -> bool:
    """Repetition collapse: some n-gram occurs ``repeats`` times or more."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return any(count >= repeats for count in grams.values())


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp of the mean negative log-likelihood per token (nats)."""
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")
