"""Carrying a persona through generated text: the source model answers with the persona and without,
the target model reads both sets of answers, and the difference of its mean block outputs is the
persona on the target.

This is extraction on the target (a difference of means over answer tokens, as in Chen et al.), with
the contrast written by the steered source instead of by system prompts: the target's own native
vector is never used, only the source persona, the source model and the target reading text. Unlike a
linear map fitted on neutral texts, it needs no text that already carries the persona's style, which
is why it carries directions a map never saw (README, "Transfer table").
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.steering.errors import SteeringError
from server.steering.mapping import calibrate, corresponding_layer
from server.steering.plan import Positions, SteeringPlan


@dataclass(frozen=True)
class GenerationSpec:
    """How the source writes the contrast: each prompt answered once steered, once not, same seed."""

    prompts: tuple[str, ...]
    max_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    concurrency: int = 32


async def _answers(backend: Backend, spec: GenerationSpec, plan: SteeringPlan | None) -> list[str]:
    gate = asyncio.Semaphore(spec.concurrency)

    async def one(index: int, prompt: str) -> str:
        sampling = SamplingParams(max_tokens=spec.max_tokens, temperature=spec.temperature,
                                  seed=spec.seed + index, clamp_to_context=True)  # fmt: skip
        request = GenerationRequest(sampling=sampling, messages=[ChatMessage("user", prompt)], steering=plan)
        async with gate:
            return "".join([chunk.text async for chunk in backend.generate(request)])

    return list(await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(spec.prompts))))


async def carry_by_generation(
    source: Backend,
    target: Backend,
    vectors: Mapping[int, np.ndarray],
    strength: float,
    positions: str,
    spec: GenerationSpec,
) -> dict[int, np.ndarray]:
    """The persona (source block -> vector, at ``strength`` and ``positions``) on the target:
    target block -> vector (float32), at the target blocks of the same relative depth, each
    calibrated so that its norm relative to the target's typical residual norm equals the source
    vector's relative norm (as every mapping method does)."""
    plan = SteeringPlan(dict(vectors), strength=strength, positions=Positions(positions))
    steered, plain = await asyncio.gather(_answers(source, spec, plan), _answers(source, spec, None))
    pairs = [(a, b) for a, b in zip(steered, plain, strict=True) if a.strip() and b.strip()]
    if not pairs:
        raise SteeringError("the source model wrote no answers to carry the persona with")
    target_steered = await target.text_activations([a for a, _ in pairs])
    target_plain = await target.text_activations([b for _, b in pairs])
    source_plain = await source.text_activations([b for _, b in pairs])
    difference = target_steered[:, 1].mean(axis=0) - target_plain[:, 1].mean(axis=0)  # [blocks, hidden]
    source_norms = np.linalg.norm(source_plain[:, 0], axis=-1).mean(axis=0)  # last-token norm per block
    target_norms = np.linalg.norm(target_plain[:, 0], axis=-1).mean(axis=0)
    source_blocks, target_blocks = source_plain.shape[2], target_plain.shape[2]
    layers: dict[int, np.ndarray] = {}
    for block, vector in vectors.items():
        target_block = corresponding_layer(block, source_blocks, target_blocks)
        norms = float(source_norms[block]), float(target_norms[target_block])
        layers[target_block] = calibrate(difference[target_block], np.asarray(vector), *norms)
    steerable = set(target.info.steerable_layers)
    layers = {block: vector for block, vector in layers.items() if block in steerable}
    if not layers:
        raise SteeringError("none of the persona's blocks corresponds to a block the target can steer")
    return layers
