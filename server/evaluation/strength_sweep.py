"""Measuring what a persona does to a served model: trait score, fluency and repetition per strength.

Every strength answers the same questions with the same sampling seeds, so differences between rows
come from the steering, not from sampling luck. Fluency is the perplexity of the answers under the
UNSTEERED model, as in the persona-vectors literature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.engine.answers import ReadBack, answer_all, ask
from server.engine.base import Backend
from server.steering.plan import Positions, SteeringPlan
from server.steering.text_quality import collapsed, distinct_ngram_ratio, perplexity


def question_seeds(questions: Sequence[str], samples: int, seed: int) -> list[tuple[str, int]]:
    """Each question ``samples`` times, sample s of question q with seed + 1000 q + s: the same
    seeds in every row of a table, so that rows differ by their steering, not by sampling luck."""
    return [
        (question, seed + 1000 * q_index + sample)
        for q_index, question in enumerate(questions)
        for sample in range(samples)
    ]


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
    rows = []
    for strength in strengths:
        plan = SteeringPlan(dict(vectors), strength=strength, positions=positions) if strength != 0 else None
        requests = [
            ask(question, max_tokens=max_tokens, temperature=temperature, seed=answer_seed, steering=plan)
            for question, answer_seed in question_seeds(questions, samples, seed)
        ]
        results = await answer_all(
            backend, requests, concurrency=concurrency, read=ReadBack(nll=True), reader=judge
        )
        answers = [answer.text for answer in results]
        words = [answer.lower().split() for answer in answers]
        rows.append(
            StrengthRow(
                persona=persona,
                strength=strength,
                trait_score=score(answers),
                perplexity=perplexity(sum(a.nll for a in results), sum(a.nll_tokens for a in results)),
                distinct_2=float(np.mean([distinct_ngram_ratio(w) for w in words])),
                collapse_rate=float(np.mean([collapsed(w) for w in words])),
                example=answers[0],
                answer_scores=tuple(score([answer]) for answer in answers),
            )
        )
    return rows
