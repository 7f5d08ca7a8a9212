"""Closed-loop steering on the demo models: `persona-server eval --closed-loop`.

For each demo model and persona, on the held-out questions with the same sampling seeds in every row:

- fixed strengths (0, 1x, 2x, 4x the persona's default, at its default positions) against targets
  (``persona_target``) set to the mean reading of the fixed 1x and 2x answers: trait score (share of
  answers with a marker word), perplexity under the unsteered model, collapse, the mean reading and the
  mean strength used;
- a rule (``persona_when``) that steers against the persona (at minus its default strength, for the
  rest of the answer) once its reading is above a threshold (midway between the mean readings of the
  unsteered model's answers to training questions with and without a system prompt that elicits the
  trait), on held-out answers with and without that system prompt: trait score with and without the
  rule, how many answers the rule fired on, and the share of the answers it never fired on that stayed
  the same. Their perplexity is judged without the system prompt (a fluent plain answer is what the
  rule is for).

Targets and bounds are the API's defaults (``persona_target`` with a score only).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.demo.corpus import POLES, held_out_questions, training_questions
from server.demo.models import load_demo_personas
from server.demo.traits import trait_rate
from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.serving.steering_loops import DEFAULT_MAX_MULTIPLE
from server.steering.closed_loop import DEFAULT_GAIN, Direction, LoopSpec, Rule, Target
from server.steering.plan import Positions, SteeringPlan, steers_generated_tokens
from server.steering.text_quality import collapsed, perplexity

FIXED_MULTIPLES = (0.0, 1.0, 2.0, 4.0)
TARGET_MULTIPLES = (1.0, 2.0)  # targets at the fixed rows' mean readings
CALIBRATION_QUESTIONS = 24


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int
    nll: float
    reading: float  # mean of the persona's per-token readings
    strength: float  # mean strength of the target persona (0 without one)
    fired: bool  # a rule steered some token


@dataclass(frozen=True)
class LoopRow:
    model: str
    persona: str
    condition: str
    trait_score: float
    perplexity: float
    collapse_rate: float
    reading: float
    mean_strength: float
    fired_share: float
    example: str
    unchanged: float | None = None  # rule rows: answers it never fired on that equal the rule-free ones

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Persona:
    name: str
    vectors: dict[int, torch.Tensor]
    default_strength: float
    positions: Positions

    @property
    def direction(self) -> Direction:
        return Direction.of(self.name, self.vectors)

    def plan(self, strength: float) -> SteeringPlan | None:
        return SteeringPlan(self.vectors, strength=strength, positions=self.positions) if strength else None


async def _answer(
    backend: Backend,
    messages: list[ChatMessage],
    plan: SteeringPlan | None,
    loop: LoopSpec,
    seed: int,
    max_tokens: int,
) -> Answer:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, clamp_to_context=True)
    request = GenerationRequest(sampling=sampling, messages=messages, steering=plan, loop=loop)
    judged = [message for message in messages if message.role != "system"]
    text, ids, traces = [], [], []
    async for chunk in backend.generate(request):
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        traces.extend(chunk.traces or ())
    name = loop.token_scores[0].name
    nll, count = await backend.response_nll(GenerationRequest(sampling=sampling, messages=judged), ids)
    return Answer(
        text="".join(text),
        tokens=count,
        nll=nll,
        reading=float(np.mean([trace.scores[name] for trace in traces])),
        strength=float(np.mean([trace.strength or 0.0 for trace in traces])),
        fired=any(trace.rules for trace in traces),
    )


@dataclass(frozen=True)
class LoopRun:
    samples: int = 2
    max_tokens: int = 48
    seed: int = 13
    gain: float = DEFAULT_GAIN


async def _answers(
    backend: Backend,
    run: LoopRun,
    plan: SteeringPlan | None,
    loop: LoopSpec,
    system: str = "",
    questions: Sequence[str] | None = None,
) -> list[Answer]:
    prefix = [ChatMessage("system", system)] if system else []
    asked = held_out_questions() if questions is None else questions

    def answer(question: str, seed: int) -> Any:
        messages = [*prefix, ChatMessage("user", question)]
        return _answer(backend, messages, plan, loop, seed, run.max_tokens)

    seeds = [
        (q, run.seed + 1000 * index + sample)
        for index, q in enumerate(asked)
        for sample in range(run.samples)
    ]
    return list(await asyncio.gather(*(answer(question, seed) for question, seed in seeds)))


def _row(
    model: str, persona: str, condition: str, answers: list[Answer], strength: float | None = None
) -> LoopRow:
    """A row of the table; ``strength``: the fixed strength (else the target's mean)."""
    texts = [answer.text for answer in answers]
    return LoopRow(
        model=model,
        persona=persona,
        condition=condition,
        trait_score=trait_rate(texts, persona),
        perplexity=perplexity(sum(a.nll for a in answers), sum(a.tokens for a in answers)),
        collapse_rate=float(np.mean([collapsed(text.lower().split()) for text in texts])),
        reading=float(np.mean([a.reading for a in answers])),
        mean_strength=float(np.mean([a.strength for a in answers])) if strength is None else strength,
        fired_share=float(np.mean([a.fired for a in answers])),
        example=texts[0],
    )


async def _target_rows(backend: Backend, model: str, persona: _Persona, run: LoopRun) -> list[LoopRow]:
    reads = LoopSpec(token_scores=(persona.direction,))
    rows, readings = [], {}
    for multiple in FIXED_MULTIPLES:
        fixed = multiple * persona.default_strength
        answers = await _answers(backend, run, persona.plan(fixed), reads)
        rows.append(_row(model, persona.name, f"fixed {multiple:g}x", answers, strength=fixed))
        readings[multiple] = rows[-1].reading
    strength = persona.default_strength
    start = strength if steers_generated_tokens(persona.positions) else 0.0
    bound = DEFAULT_MAX_MULTIPLE * abs(strength)
    for multiple in TARGET_MULTIPLES:
        score = readings[multiple]
        target = Target(persona.direction, persona.vectors, score, strength, bound, run.gain, start)
        loop = LoopSpec(token_scores=(persona.direction,), target=target)
        answers = await _answers(backend, run, persona.plan(strength), loop)
        rows.append(_row(model, persona.name, f"target = {multiple:g}x reading", answers))
    return rows


async def _rule_rows(backend: Backend, model: str, persona: _Persona, run: LoopRun) -> list[LoopRow]:
    reads = LoopSpec(token_scores=(persona.direction,))
    system = POLES[persona.name].system_prompts[0]
    calibration = [question for _, question in training_questions()[:CALIBRATION_QUESTIONS]]
    plain = await _token_readings(backend, run, reads, calibration, "")
    elicited = await _token_readings(backend, run, reads, calibration, system)
    threshold = float((plain.mean() + elicited.mean()) / 2)
    # Once it fires, it steers the rest of the answer (for_tokens: the answer's length).
    rule = Rule(
        persona.direction,
        threshold,
        True,
        persona.name,
        persona.vectors,
        -persona.default_strength,
        for_tokens=run.max_tokens,
        positions=persona.positions,
    )
    ruled = LoopSpec(token_scores=(persona.direction,), rules=(rule,))
    rows = []
    for label, prompt in ((f"system prompt '{system}'", system), ("no system prompt", "")):
        free = await _answers(backend, run, None, reads, prompt)
        rows.append(_row(model, persona.name, label, free))
        answers = await _answers(backend, run, None, ruled, prompt)
        quiet = [(a.text, b.text) for a, b in zip(answers, free, strict=True) if not a.fired]
        unchanged = float(np.mean([a == b for a, b in quiet])) if quiet else None
        row = _row(model, persona.name, f"{label} + rule (above {threshold:.2f})", answers)
        rows.append(dataclasses.replace(row, unchanged=unchanged))
    return rows


async def _token_readings(
    backend: Backend, run: LoopRun, loop: LoopSpec, questions: Sequence[str], system: str
) -> np.ndarray:
    """Every per-token reading of the unsteered model's answers to ``questions``."""
    name = loop.token_scores[0].name
    prefix = [ChatMessage("system", system)] if system else []
    sampling = SamplingParams(max_tokens=run.max_tokens, temperature=1.0, seed=run.seed)

    async def read(question: str) -> list[float]:
        messages = [*prefix, ChatMessage("user", question)]
        request = GenerationRequest(sampling=sampling, messages=messages, loop=loop)
        chunks = [chunk async for chunk in backend.generate(request)]
        return [trace.scores[name] for chunk in chunks for trace in chunk.traces or ()]

    return np.concatenate(await asyncio.gather(*(read(question) for question in questions)))


async def closed_loop_rows(
    backend: Backend,
    model: str,
    run: LoopRun,
    personas: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LoopRow]:
    rows: list[LoopRow] = []
    for draft in load_demo_personas(model):
        if personas is not None and draft.name not in personas:
            continue
        vectors = {block: torch.as_tensor(v) for block, v in draft.vectors.items()}
        persona = _Persona(draft.name, vectors, draft.default_strength, Positions(draft.default_positions))
        rows += await _target_rows(backend, model, persona, run)
        rows += await _rule_rows(backend, model, persona, run)
        if progress is not None:
            progress(f"{model} {draft.name}: done")
    return rows


def format_loop_table(rows: Sequence[LoopRow]) -> str:
    lines = [
        "| model | persona | condition | trait score | perplexity | collapse | mean reading | mean strength "
        "| rule fired | untriggered unchanged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.persona} | {row.condition} | {row.trait_score:.2f} "
            f"| {row.perplexity:.2f} | {row.collapse_rate:.2f} | {row.reading:.2f} "
            f"| {row.mean_strength:.2f} | {row.fired_share:.2f} "
            f"| {'' if row.unchanged is None else f'{row.unchanged:.2f}'} |"
        )
    return "\n".join(lines)
