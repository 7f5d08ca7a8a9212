"""The teacher's answers: the steered model, served by any engine, answering prompts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from server.baking.distill import Trajectory
from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.engine.prompts import prompt_ids
from server.steering.plan import SteeringPlan

# Requests in flight at once by default: enough to fill an engine's batch. A server passes fewer,
# so that its chat finds batch rows free while a bake samples (issue 29).
CONCURRENCY = 32


async def _answer(backend: Backend, request: GenerationRequest) -> tuple[int, ...]:
    ids: list[int] = []
    async for chunk in backend.generate(request):
        ids.extend(chunk.token_ids)
    return tuple(ids)


async def sample_trajectories(
    backend: Backend,
    tokenizer: Any,
    plan: SteeringPlan,
    prompts: Sequence[str],
    count: int,
    max_tokens: int,
    temperature: float,
    seed: int,
    progress: Callable[[float], None] | None = None,
    concurrency: int = CONCURRENCY,
) -> list[Trajectory]:
    """``count`` answers of the steered model, prompt i % len(prompts) with seed + i; empty answers
    are dropped. The prompt's tokens come from ``tokenizer`` (the student's), rendered as the engine
    renders them, so teacher and student read exactly the prompt the answer was written after."""
    if not prompts:
        raise ValueError("no prompts to sample trajectories from")
    requests = [
        GenerationRequest(
            messages=[ChatMessage("user", prompts[i % len(prompts)])],
            sampling=SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=seed + i, clamp_to_context=True
            ),
            steering=plan,
        )
        for i in range(count)
    ]
    gate, answered = asyncio.Semaphore(concurrency), 0

    async def one(request: GenerationRequest) -> tuple[int, ...]:
        nonlocal answered
        async with gate:  # a sliding window: the next request starts as soon as one ends
            answer = await _answer(backend, request)
        answered += 1
        if progress is not None:
            progress(answered / count)
        return answer

    answers = await asyncio.gather(*(one(request) for request in requests))
    return [
        Trajectory(tuple(prompt_ids(tokenizer, request, backend.info)), answer)
        for request, answer in zip(requests, answers, strict=True)
        if answer
    ]
