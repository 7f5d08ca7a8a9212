"""Next-token choice per row, with vLLM's sampling parameters and in vLLM's order.

Stop ids are held back below ``min_tokens``; then penalties; then greedy rows take the argmax, and
sampled rows divide by the temperature and keep what ``min_p``, ``top_k`` and ``top_p`` allow, drawing
with their own seeded generator. Log-probabilities are read from the model's logits before any of
that (vLLM's default, ``raw_logprobs``), so they describe the steered model itself.
"""

from __future__ import annotations

from collections.abc import Sequence as Rows

import torch

from server.engine.base import SamplingParams, TokenLogprob
from server.engine.sequence import Sequence


def _held_back_ids(sequence: Sequence, eos_token_ids: set[int], vocab: int) -> list[int]:
    """Ids that may not be chosen yet: below ``min_tokens``, whatever would end the answer."""
    sampling = sequence.sampling
    if len(sequence.output_ids) >= sampling.min_tokens:
        return []
    ends = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else eos_token_ids)
    return sorted(token for token in ends if token < vocab)


def _penalized(logits: torch.Tensor, sequence: Sequence) -> torch.Tensor:
    """Repetition penalty over prompt and answer, then OpenAI's frequency and presence penalties."""
    sampling = sequence.sampling
    vocab = logits.shape[-1]
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*sequence.prompt_ids, *sequence.output_ids}), dtype=torch.long)
        seen = seen[seen < vocab]
        values = logits[seen]
        penalty = sampling.repetition_penalty
        logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if sequence.output_ids and (sampling.frequency_penalty or sampling.presence_penalty):
        counts = torch.bincount(torch.tensor(sequence.output_ids), minlength=vocab)[:vocab].to(logits.dtype)
        present = (counts > 0).to(logits.dtype)
        logits -= sampling.frequency_penalty * counts + sampling.presence_penalty * present
    return logits


def processed_logits(logits: torch.Tensor, sequence: Sequence, eos_token_ids: set[int]) -> torch.Tensor:
    """``logits`` [vocab] after the min_tokens hold-back and the penalties (a copy when changed)."""
    held = _held_back_ids(sequence, eos_token_ids, int(logits.shape[-1]))
    if not held and not sequence.sampling.penalized:
        return logits
    logits = logits.float().clone()
    if held:
        logits[held] = float("-inf")
    return _penalized(logits, sequence) if sequence.sampling.penalized else logits


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    # float64: a top_p or temperature at the edge of float32 must not empty the distribution.
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if 0 < params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        probs = probs / probs.sum()
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


def _logprob(raw: torch.Tensor, token: int, count: int, sequence: Sequence) -> TokenLogprob:
    logprobs = torch.log_softmax(raw.double(), dim=-1)
    name = sequence.text.token_text
    top: tuple[tuple[int, str, float], ...] = ()
    if count:
        values, ids = torch.topk(logprobs, min(count, int(logprobs.shape[-1])))
        top = tuple((i, name(i), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, name(token), float(logprobs[token]), top)


def next_token(
    logits: torch.Tensor, sequence: Sequence, eos_token_ids: set[int]
) -> tuple[int, TokenLogprob | None]:
    """The sequence's next token from ``logits`` [vocab], and its logprobs if the request asked."""
    params = sequence.sampling
    processed = processed_logits(logits, sequence, eos_token_ids)
    token = int(torch.argmax(processed)) if params.greedy else _draw(processed, params, sequence.generator)
    if params.logprobs is None:
        return token, None
    return token, _logprob(logits, token, params.logprobs, sequence)


def next_tokens(
    logits: torch.Tensor, sequences: Rows[Sequence], eos_token_ids: set[int]
) -> list[tuple[int, TokenLogprob | None]]:
    """One token per row of ``logits`` [rows, vocab]; plain greedy rows share one argmax."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        (greedy[row], None) if s.sampling.plain_argmax else next_token(logits[row].cpu(), s, eos_token_ids)
        for row, s in enumerate(sequences)
    ]
