"""Carrying a persona through generated text: the source model answers with the persona and without,
the target model reads both sets of answers as its own answers to the same prompts, and the
difference of its mean block outputs over the answer tokens is the persona on the target.

This is extraction on the target (a difference of means over answer tokens, as in Chen et al.), with
the contrast written by the steered source instead of by system prompts: the target's own native
vector is never used, only the source persona, the source model and the target reading text. Unlike a
linear map fitted on neutral texts, it needs no text that already carries the persona's style, which
is why it carries directions a map never saw (README, "Transfer table").

The target reads each answer after the prompt in its chat template, as extraction reads its own
answers: read as bare text, the same answers gave directions further from the native persona's
(cosine 0.19-0.76 against 0.28-0.90 on the demo models' blocks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.serving.strength_calibration import StrengthCalibration, calibrate_scale, read_unsteered
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
    calibration_prompts: int = 48  # how many of the prompts the target answers per calibration step
    # A persona on one source block is also tried at the target blocks this far from the block of
    # the same relative depth, and kept where its calibration forecasts the most transfer (on the
    # demo models the best block per persona gave 0.90 of native against 0.66 at the same depth).
    block_search: int = 2

    def calibration_subset(self) -> tuple[str, ...]:
        """Every k-th prompt, ``calibration_prompts`` of them at most, spread over the whole list."""
        return self.prompts[:: max(1, -(-len(self.prompts) // self.calibration_prompts))]


@dataclass(frozen=True)
class CarriedPersona:
    vectors: dict[int, np.ndarray]  # target block -> vector, at the calibrated scale
    calibration: StrengthCalibration
    # Each placement tried (target blocks, its calibration), the kept one among them.
    placements: tuple[tuple[tuple[int, ...], StrengthCalibration], ...] = ()

    def provenance(self) -> dict[str, object]:
        """The calibration as the mapped persona's provenance records it."""
        record = self.calibration.to_dict()
        if len(self.placements) > 1:
            record["blocks_tried"] = [
                {
                    "blocks": list(blocks),
                    "scale": tried.scale,
                    "predicted_transfer": round(tried.predicted_transfer, 4),
                }
                for blocks, tried in self.placements
            ]
        return record


def _request(prompt: str, sampling: SamplingParams, plan: SteeringPlan | None = None) -> GenerationRequest:
    return GenerationRequest(sampling=sampling, messages=[ChatMessage("user", prompt)], steering=plan)


async def _answers(backend: Backend, spec: GenerationSpec, plan: SteeringPlan | None) -> list[str]:
    gate = asyncio.Semaphore(spec.concurrency)

    async def one(index: int, prompt: str) -> str:
        sampling = SamplingParams(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            seed=spec.seed + index,
            clamp_to_context=True,
        )
        async with gate:
            return "".join([chunk.text async for chunk in backend.generate(_request(prompt, sampling, plan))])

    return list(await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(spec.prompts))))


async def _read_as_answers(
    backend: Backend, spec: GenerationSpec, answers: list[tuple[str, list[int]]]
) -> np.ndarray:
    """Mean block outputs over each (prompt, answer ids)'s answer tokens, read by ``backend``
    unsteered as its own answer to the prompt: [blocks, hidden], averaged over the answers."""
    gate = asyncio.Semaphore(spec.concurrency)
    sampling = SamplingParams(max_tokens=spec.max_tokens, clamp_to_context=True)

    async def one(prompt: str, ids: list[int]) -> np.ndarray:
        async with gate:
            return await backend.response_activations(_request(prompt, sampling), ids)

    return np.mean(await asyncio.gather(*(one(prompt, ids) for prompt, ids in answers)), axis=0)


@dataclass(frozen=True)
class _Contrast:
    """What the target read: the persona's shift per target block, and the norms that calibrate."""

    difference: np.ndarray  # [target blocks, hidden]
    source_norms: np.ndarray  # typical residual norm per source block
    target_norms: np.ndarray  # per target block


async def _contrast(source: Backend, target: Backend, plan: SteeringPlan, spec: GenerationSpec) -> _Contrast:
    steered, plain = await asyncio.gather(_answers(source, spec, plan), _answers(source, spec, None))
    # Each answer in the target's tokens, once; a pair with an empty side is dropped.
    encoded = [
        (prompt, target.answer_ids(a), target.answer_ids(b), b)
        for prompt, a, b in zip(spec.prompts, steered, plain, strict=True)
    ]
    kept = [(prompt, a_ids, b_ids, b) for prompt, a_ids, b_ids, b in encoded if a_ids and b_ids]
    if not kept:
        raise SteeringError("the source model wrote no answers to carry the persona with")
    target_steered = await _read_as_answers(target, spec, [(prompt, ids) for prompt, ids, _, _ in kept])
    target_plain = await _read_as_answers(target, spec, [(prompt, ids) for prompt, _, ids, _ in kept])
    # Norms for calibration as every mapping method takes them: last tokens of plain text.
    source_plain = await source.text_activations([b for *_, b in kept])
    target_plain_text = await target.text_activations([b for *_, b in kept])
    return _Contrast(
        target_steered - target_plain,
        np.linalg.norm(source_plain[:, 0], axis=-1).mean(axis=0),
        np.linalg.norm(target_plain_text[:, 0], axis=-1).mean(axis=0),
    )


def _placements(
    vectors: Mapping[int, np.ndarray],
    contrast: _Contrast,
    steerable: set[int],
    block_pairs: Mapping[int, int] | None,
    search: int,
) -> list[dict[int, np.ndarray]]:
    """The placements to try, norm-calibrated: the blocks of the same relative depth (or
    ``block_pairs``), then, for a persona on one block, its neighbours up to ``search`` away,
    nearest first (so that a tie keeps the nearer block)."""
    same_depth = {
        block: corresponding_layer(block, len(contrast.source_norms), len(contrast.target_norms))
        for block in vectors
    }
    candidates = [{**same_depth, **(block_pairs or {})}]
    if block_pairs is None and len(vectors) == 1:
        ((block, depth),) = same_depth.items()
        offsets = sorted(range(-search, search + 1), key=lambda offset: (abs(offset), offset))[1:]
        candidates += [{block: depth + offset} for offset in offsets if depth + offset in steerable]
    placements = []
    for pairs in candidates:
        layers = {}
        for block, vector in vectors.items():
            there = pairs[block]
            norms = float(contrast.source_norms[block]), float(contrast.target_norms[there])
            if there in steerable:
                layers[there] = calibrate(contrast.difference[there], np.asarray(vector), *norms)
        if layers:
            placements.append(layers)
    return placements


async def carry_by_generation(
    source: Backend,
    target: Backend,
    vectors: Mapping[int, np.ndarray],
    strength: float,
    positions: str,
    spec: GenerationSpec,
    block_pairs: Mapping[int, int] | None = None,
) -> CarriedPersona:
    """The persona (source block -> vector, at ``strength`` and ``positions``) on the target:
    target block -> vector (float32), at the target blocks of the same relative depth, each scaled so
    that its norm relative to the target's typical residual norm equals the source vector's relative
    norm (as every mapping method does), then all by the scale calibrated on the target at the
    source's ``strength`` (``strength_calibration``): the persona keeps the source's default. A
    persona on one block is also tried ``spec.block_search`` blocks around that depth (the
    placement whose calibration forecasts the most transfer is kept). ``block_pairs`` (source block
    -> target block) fixes the placement instead."""
    plan = SteeringPlan(dict(vectors), strength=strength, positions=Positions(positions))
    contrast = await _contrast(source, target, plan, spec)
    steerable = set(target.info.steerable_layers)
    placements = _placements(vectors, contrast, steerable, block_pairs, spec.block_search)
    if not placements:
        raise SteeringError("none of the persona's blocks corresponds to a block the target can steer")
    prompts = spec.calibration_subset()
    plain = await read_unsteered(target, prompts, spec.max_tokens, spec.seed)
    trials: list[tuple[dict[int, np.ndarray], StrengthCalibration]] = []
    for layers in placements:
        calibration = await calibrate_scale(
            target,
            layers,
            {block: contrast.difference[block] for block in layers},
            strength,
            positions,
            prompts,
            plain,
            spec.max_tokens,
            spec.seed,
        )
        trials.append((layers, calibration))
    layers, calibration = max(trials, key=lambda trial: trial[1].predicted_transfer)  # first of equals
    scaled = {block: (vector * calibration.scale).astype(np.float32) for block, vector in layers.items()}
    tried = tuple((tuple(sorted(placed)), placed_calibration) for placed, placed_calibration in trials)
    return CarriedPersona(scaled, calibration, tried)
