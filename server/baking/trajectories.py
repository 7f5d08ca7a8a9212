"""The teacher's answers: the steered model, served by any engine, answering prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.baking.distill import Trajectory
from server.engine.answers import answer_all, ask
from server.engine.base import Backend
from server.engine.prompts import prompt_ids
from server.steering.plan import SteeringPlan

# Requests in flight at once by default: enough to fill an engine's batch. A server passes fewer,
# so that its chat finds batch rows free while a bake samples (issue 29).
CONCURRENCY = 32


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
        ask(
            prompts[i % len(prompts)],
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed + i,
            steering=plan,
        )
        for i in range(count)
    ]
    answers = await answer_all(
        backend,
        requests,
        concurrency=concurrency,  # a sliding window: the next request starts as soon as one ends
        progress=None if progress is None else lambda answered: progress(answered / count),
    )
    return [
        Trajectory(tuple(prompt_ids(tokenizer, answer.request, backend.info)), answer.token_ids)
        for answer in answers
        if answer.token_ids
    ]
