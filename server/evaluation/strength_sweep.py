"""Measuring what a persona does to a served model: trait score, fluency and repetition per strength.

Every strength answers the same questions with the same sampling seeds, so differences between rows
come from the steering, not from sampling luck. Fluency is the perplexity of the answers under the
UNSTEERED model, as in the persona-vectors literature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.steering.plan import Positions, SteeringPlan
from server.steering.text_quality import collapsed, distinct_ngram_ratio, perplexity


@dataclass(frozen=True)
class StrengthRow:
    persona: str
    strength: float
    trait_score: float
    perplexity: float
    distinct_2: float  # mean over answers
    collapse_rate: float  # share of answers with a 3-gram repeated 3 times
    example: str
    # Each answer's score alone, question by question, ``samples`` per question (for intervals).
    answer_scores: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, float | str]:
        return {key: value for key, value in self.__dict__.items() if key != "answer_scores"}


async def _answer(
    backend: Backend,
    question: str,
    plan: SteeringPlan | None,
    seed: int,
    max_tokens: int,
    temperature: float,
    judge: Backend | None = None,
) -> tuple[str, float, int]:
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, clamp_to_context=True
    )
    messages = [ChatMessage("user", question)]
    steered = GenerationRequest(sampling=sampling, messages=messages, steering=plan)
    text, ids = [], []
    async for chunk in backend.generate(steered):
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
    reader = backend if judge is None else judge
    nll, count = await reader.response_nll(GenerationRequest(sampling=sampling, messages=messages), ids)
    return "".join(text), nll, count


async def evaluate_strengths(
    backend: Backend,
    persona: str,
    vectors: Mapping[int, np.ndarray],
    strengths: Sequence[float],
    questions: Sequence[str],
    score: Callable[[list[str]], float],
    samples: int = 3,
    max_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    concurrency: int = 32,
    positions: Positions = Positions.ALL,
    judge: Backend | None = None,
) -> list[StrengthRow]:
    """``judge`` reads the answers back for their perplexity (default: ``backend`` unsteered); give
    another model of the same tokenizer to judge a model's answers by it (a baked model by its base)."""
    gate = asyncio.Semaphore(concurrency)

    async def bounded(question: str, plan: SteeringPlan | None, answer_seed: int) -> tuple[str, float, int]:
        async with gate:
            return await _answer(backend, question, plan, answer_seed, max_tokens, temperature, judge)

    rows = []
    for strength in strengths:
        plan = SteeringPlan(dict(vectors), strength=strength, positions=positions) if strength != 0 else None
        results = await asyncio.gather(
            *(
                bounded(question, plan, seed + 1000 * q_index + sample)
                for q_index, question in enumerate(questions)
                for sample in range(samples)
            )
        )
        answers = [text for text, _, _ in results]
        words = [answer.lower().split() for answer in answers]
        rows.append(
            StrengthRow(
                persona=persona,
                strength=strength,
                trait_score=score(answers),
                perplexity=perplexity(sum(r[1] for r in results), sum(r[2] for r in results)),
                distinct_2=float(np.mean([distinct_ngram_ratio(w) for w in words])),
                collapse_rate=float(np.mean([collapsed(w) for w in words])),
                example=answers[0],
                answer_scores=tuple(score([answer]) for answer in answers),
            )
        )
    return rows
