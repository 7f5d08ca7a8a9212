"""Running a persona extraction on a served model: generate contrastive answers, capture activations.

Answers are generated through the engine (so extraction batches with live traffic), then each answer
is read back once, unsteered, to take the mean output of every decoder block over its tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.steering.extraction import PersonaDirections, persona_directions

Progress = Callable[[float], None]


@dataclass(frozen=True)
class ExtractionSpec:
    positive_prompts: Sequence[str]
    negative_prompts: Sequence[str]
    questions: Sequence[str]
    samples_per_question: int = 1
    max_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    # Optional filter, as the paper keeps only answers its judge scores as showing the trait:
    # (positive?, answer text) -> keep?
    accept: Callable[[bool, str], bool] | None = None
    concurrency: int = 16

    def __post_init__(self) -> None:
        if not self.positive_prompts or not self.negative_prompts or not self.questions:
            raise ValueError("extraction needs positive prompts, negative prompts and questions")
        if self.samples_per_question < 1:
            raise ValueError("samples_per_question must be at least 1")


@dataclass
class ExtractionResult:
    directions: PersonaDirections
    kept: dict[str, int]  # answers used, per side
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few answers per side

    def summary(self) -> dict[str, Any]:
        return {
            "recommended_layer": self.directions.recommended_layer,
            "layers": [report.to_dict() for report in self.directions.reports],
            "answers_used": self.kept,
            "examples": self.examples,
        }


def conversation(system: str, question: str) -> list[ChatMessage]:
    """What the model answers: the question, under the side's system prompt (none when empty)."""
    return [*([ChatMessage("system", system)] if system else []), ChatMessage("user", question)]


def pairings(prompts: Sequence[str], spec: ExtractionSpec) -> Iterator[tuple[int, int, int]]:
    """(question, sample, system prompt) indices of every answer of one side, in order: sample s of
    question q answers under prompt (q + s) mod the side's prompts."""
    for q_index in range(len(spec.questions)):
        for sample in range(spec.samples_per_question):
            yield q_index, sample, (q_index + sample) % len(prompts)


def _requests(prompts: Sequence[str], spec: ExtractionSpec, side: int) -> list[GenerationRequest]:
    requests = []
    for q_index, sample, p_index in pairings(prompts, spec):
        sampling = SamplingParams(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            clamp_to_context=True,
            seed=spec.seed + 1_000_003 * side + 1009 * q_index + sample,
        )
        messages = conversation(prompts[p_index], spec.questions[q_index])
        requests.append(GenerationRequest(sampling=sampling, messages=messages))
    return requests


async def _answer_activations(
    backend: Backend, request: GenerationRequest, positive: bool, spec: ExtractionSpec
) -> tuple[str, np.ndarray | None]:
    text, ids = [], []
    async for chunk in backend.generate(request):
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
    answer = "".join(text)
    if spec.accept is not None and not spec.accept(positive, answer):
        return answer, None
    return answer, await backend.response_activations(request, ids)


async def extract(
    backend: Backend, spec: ExtractionSpec, progress: Progress | None = None
) -> ExtractionResult:
    sides = {
        True: _requests(spec.positive_prompts, spec, 1),
        False: _requests(spec.negative_prompts, spec, 2),
    }
    total = sum(len(requests) for requests in sides.values())
    done = 0
    gate = asyncio.Semaphore(spec.concurrency)

    async def one(request: GenerationRequest, positive: bool) -> tuple[str, np.ndarray | None]:
        nonlocal done
        async with gate:
            result = await _answer_activations(backend, request, positive, spec)
        done += 1
        if progress is not None:
            progress(done / total)
        return result

    activations: dict[bool, list[np.ndarray]] = {True: [], False: []}
    examples: dict[str, list[str]] = {}
    for positive, requests in sides.items():
        results = await asyncio.gather(*(one(request, positive) for request in requests))
        activations[positive] = [acts for _, acts in results if acts is not None]
        examples["positive" if positive else "negative"] = [answer for answer, _ in results[:3]]
    if not activations[True] or not activations[False]:
        raise ValueError("the answer filter kept no answer on one side; nothing to extract")
    directions = persona_directions(np.stack(activations[True]), np.stack(activations[False]))
    kept = {"positive": len(activations[True]), "negative": len(activations[False])}
    return ExtractionResult(directions=directions, kept=kept, examples=examples)
