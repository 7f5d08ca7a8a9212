"""The teacher's answers: the steered model, served by any engine, answering prompts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from server.baking.distill import Trajectory
from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.engine.prompts import prompt_ids
from server.steering.plan import SteeringPlan

# Requests in flight at once: enough to fill an engine's batch, few enough to keep memory flat.
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
    trajectories: list[Trajectory] = []
    for start in range(0, count, CONCURRENCY):
        chunk = requests[start : start + CONCURRENCY]
        answers = await asyncio.gather(*(_answer(backend, request) for request in chunk))
        for request, answer in zip(chunk, answers, strict=True):
            if answer:
                trajectories.append(Trajectory(tuple(prompt_ids(tokenizer, request, backend.info)), answer))
        if progress is not None:
            progress(min(start + CONCURRENCY, count) / count)
    return trajectories
