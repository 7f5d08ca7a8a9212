"""Carrying a persona to another model, by any method: ``carry_persona``, the one function the
server's map request (``server.admin.persona_mapping``) and the evaluation's transfer table
(``server.evaluation.transfer_table``) call, so the table measures exactly what the server stores.
A method that works on stored vectors (a fitted map, zero padding, interpolation, a random
rotation, the concept adapter) is arithmetic (``maps.py``); the generated method, here, drives both
models.

The generated method: the source model answers with the persona and without, the target model reads
both sets of answers as its own answers to the same prompts, and the difference of its mean block
outputs over the answer tokens is the persona on the target. This is extraction on the target (a
difference of means over answer tokens, as in Chen et al.), with the contrast written by the steered
source instead of by system prompts: the target's own native vector is never used, only the source
persona, the source model and the target reading text. Unlike a linear map fitted on neutral texts,
it needs no text that already carries the persona's style, which is why it carries directions a map
never saw (docs/results/transfer.md).

The target reads each answer after the prompt in its chat template, as extraction reads its own
answers: read as bare text, the same answers gave directions further from the native persona's
(cosine 0.19-0.76 against 0.28-0.90 on the demo models' blocks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from server.engine.answers import Answer, ReadBack, answer_all, ask, read_all, written
from server.engine.base import Backend, ModelInfo
from server.steering.errors import SteeringError
from server.steering.mapping import MappingMethod, calibrate, corresponding_layer
from server.steering.plan import Positions, SteeringPlan
from server.steering.text_quality import perplexity
from server.transfer.maps import ConceptPair, FittedMap, ModelShape, map_persona_vectors
from server.transfer.strength_calibration import (
    StrengthCalibration,
    calibrate_scale,
    fluency_bar,
    read_unsteered,
)

# The server's generated method: how many texts of the fitting corpus the source answers (twice
# each), and how many of them the target answers per calibration step. Few suffice: on the demo
# models 18 prompts carried as much as 140 (docs/results/transfer.md, the ablations), and the map
# request waits for all of it.
GENERATION_PROMPTS = 48
CALIBRATION_PROMPTS = 24
# A pair enters the contrast only when both answers have at least this many words. A persona pushed
# hard makes the source answer now and then with a bare "!" or "ho!": read as an answer, such a stub
# is a direction of breakdown, not of the persona, and it weighs as much as a long answer in the
# mean. On the demo models, demo-phi3's personas (strength 8) wrote such stubs to a third of the
# prompts, and the target steered by the contrast wrote *less* silly than unsteered; without them,
# 0.6-0.7 of the native effect (docs/results/transfer.md). Repetition is kept: a pirate answer that
# says "arr, matey" over and over is still the persona (dropping such answers too halved
# demo-qwen -> demo-llama pirate).
CONTRAST_MIN_WORDS = 4
# Where the generated method stands (of 1) once the source has written the contrast and the target
# has read it; the rest is the target's calibration, shared among the placements tried.
WRITTEN, READ, CALIBRATING = 0.45, 0.55, 0.6

Progress = Callable[[float], None]


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

    @classmethod
    def server_default(cls, texts: Sequence[str]) -> GenerationSpec:
        """The server's spec: the first ``GENERATION_PROMPTS`` texts of its fitting corpus."""
        return cls(prompts=tuple(texts[:GENERATION_PROMPTS]), calibration_prompts=CALIBRATION_PROMPTS)


@dataclass(frozen=True)
class SourcePersona:
    """What is carried: the persona's vectors on the source (block -> vector), and the strength and
    positions it is used at by default (the carried persona keeps them)."""

    vectors: Mapping[int, np.ndarray]
    default_strength: float
    default_positions: str


@dataclass(frozen=True)
class CarriedPersona:
    vectors: dict[int, np.ndarray]  # target block -> vector (float32), at the calibrated scale
    # How the generated method calibrated the vectors' scale on the target; None for the others.
    calibration: StrengthCalibration | None = None
    # Each placement tried (target blocks, its calibration), the kept one among them.
    placements: tuple[tuple[tuple[int, ...], StrengthCalibration], ...] = ()

    @property
    def predicted_transfer(self) -> float | None:
        """The calibration's forecast of transfer at the default strength, where there is one."""
        return None if self.calibration is None else self.calibration.predicted_transfer

    def provenance(self) -> dict[str, object] | None:
        """The calibration as the mapped persona's provenance records it (None: not calibrated)."""
        if self.calibration is None:
            return None
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


async def _answers(
    backend: Backend, spec: GenerationSpec, plan: SteeringPlan | None, progress: Callable[[int], None] | None
) -> list[Answer]:
    requests = [
        ask(
            prompt,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            seed=spec.seed + index,
            steering=plan,
        )
        for index, prompt in enumerate(spec.prompts)
    ]
    return await answer_all(backend, requests, concurrency=spec.concurrency, progress=progress)


async def _read_as_answers(backend: Backend, spec: GenerationSpec, answers: list[Answer]) -> np.ndarray:
    """Mean block outputs over each answer's tokens (in ``backend``'s tokens), read by ``backend``
    unsteered as its own answer to the prompt: [blocks, hidden], averaged over the answers."""
    read = await read_all(backend, answers, ReadBack(activations=True), spec.concurrency)
    return np.mean([answer.activations for answer in read], axis=0)


@dataclass(frozen=True)
class _Contrast:
    """What the target read: the persona's shift per target block, and the norms that calibrate."""

    difference: np.ndarray  # [target blocks, hidden]
    source_norms: np.ndarray  # typical residual norm per source block
    target_norms: np.ndarray  # per target block
    # The persona's cost in fluency on the source: its steered answers' perplexity under the
    # unsteered source over its unsteered answers'.
    source_perplexity_ratio: float


def enters_contrast(text: str) -> bool:
    """Whether an answer has the words to enter the contrast (``CONTRAST_MIN_WORDS``)."""
    return len(text.split()) >= CONTRAST_MIN_WORDS


def _counted(progress: Progress | None, total: int, share: float) -> Callable[[int], None] | None:
    """A count of ``total`` pieces of work (several callers may report: they are summed) as a
    fraction up to ``share``."""
    if progress is None:
        return None
    done = 0

    def one_more(_: int) -> None:
        nonlocal done
        done += 1
        progress(share * done / total)

    return one_more


async def _contrast(
    source: Backend, target: Backend, plan: SteeringPlan, spec: GenerationSpec, progress: Progress | None
) -> _Contrast:
    written_one = _counted(progress, 2 * len(spec.prompts), WRITTEN)
    steered, plain = await asyncio.gather(
        _answers(source, spec, plan, written_one), _answers(source, spec, None, written_one)
    )
    # Each pair as the source wrote it (for its perplexity cost) and in the target's tokens, once;
    # a pair with a side too short to read is dropped.
    as_written: list[tuple[Answer, Answer]] = []
    kept: list[tuple[Answer, Answer]] = []
    for a, b in zip(steered, plain, strict=True):
        encoded = a.in_tokens_of(target), b.in_tokens_of(target)
        if all(map(written, encoded)) and enters_contrast(a.text) and enters_contrast(b.text):
            as_written.append((a, b))
            kept.append(encoded)
    if not kept:
        raise SteeringError(
            f"the source model wrote no answers of {CONTRAST_MIN_WORDS} words or more to carry the "
            "persona with"
        )
    source_ratio = await _perplexity_ratio(source, spec, as_written)
    target_steered = await _read_as_answers(target, spec, [a for a, _ in kept])
    target_plain = await _read_as_answers(target, spec, [b for _, b in kept])
    # Norms for calibration as every mapping method takes them: last tokens of plain text.
    source_plain = await source.text_activations([b.text for _, b in kept])
    target_plain_text = await target.text_activations([b.text for _, b in kept])
    if progress is not None:
        progress(READ)
    return _Contrast(
        target_steered - target_plain,
        np.linalg.norm(source_plain[:, 0], axis=-1).mean(axis=0),
        np.linalg.norm(target_plain_text[:, 0], axis=-1).mean(axis=0),
        source_ratio,
    )


async def _perplexity_ratio(
    source: Backend, spec: GenerationSpec, pairs: list[tuple[Answer, Answer]]
) -> float:
    """The source's steered answers' perplexity over its unsteered answers', both read back by the
    unsteered source (its own tokens: the answers as it wrote them)."""
    read = await read_all(
        source, [answer for pair in pairs for answer in pair], ReadBack(nll=True), spec.concurrency
    )
    steered, plain = read[0::2], read[1::2]
    return perplexity(sum(a.nll for a in steered), sum(a.nll_tokens for a in steered)) / perplexity(
        sum(a.nll for a in plain), sum(a.nll_tokens for a in plain)
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
    progress: Progress | None = None,
) -> CarriedPersona:
    """The persona (source block -> vector, at ``strength`` and ``positions``) on the target:
    target block -> vector (float32), at the target blocks of the same relative depth, each scaled so
    that its norm relative to the target's typical residual norm equals the source vector's relative
    norm (as every mapping method does), then all by the scale calibrated on the target at the
    source's ``strength`` (``strength_calibration``): the persona keeps the source's default. A
    persona on one block is also tried ``spec.block_search`` blocks around that depth (the
    placement whose calibration forecasts the most transfer is kept). ``block_pairs`` (source block
    -> target block) fixes the placement instead. ``progress`` hears the fraction done (a job's
    callback: it may raise to stop the work)."""
    plan = SteeringPlan(dict(vectors), strength=strength, positions=Positions(positions))
    contrast = await _contrast(source, target, plan, spec, progress)
    steerable = set(target.info.steerable_layers)
    placements = _placements(vectors, contrast, steerable, block_pairs, spec.block_search)
    if not placements:
        raise SteeringError("none of the persona's blocks corresponds to a block the target can steer")
    prompts = spec.calibration_subset()
    plain = await read_unsteered(target, prompts, spec.max_tokens, spec.seed)
    trials: list[tuple[dict[int, np.ndarray], StrengthCalibration]] = []
    for index, layers in enumerate(placements):
        if progress is not None:
            progress(CALIBRATING + (1 - CALIBRATING) * index / len(placements))
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
            fluency_bar(contrast.source_perplexity_ratio),
        )
        trials.append((layers, calibration))
    layers, calibration = max(trials, key=lambda trial: trial[1].predicted_transfer)  # first of equals
    scaled = {block: (vector * calibration.scale).astype(np.float32) for block, vector in layers.items()}
    tried = tuple((tuple(sorted(placed)), placed_calibration) for placed, placed_calibration in trials)
    return CarriedPersona(scaled, calibration, tried)


def model_shape(info: ModelInfo) -> ModelShape:
    return ModelShape(info.num_layers, info.hidden_size, tuple(info.steerable_layers))


def drives_models(method: MappingMethod) -> bool:
    """Whether the method generates and reads with both models (a job's work, which waits for a
    turn among the jobs) rather than doing arithmetic on stored vectors."""
    return method is MappingMethod.GENERATED


async def carry_persona(
    method: MappingMethod,
    persona: SourcePersona,
    source: Backend,
    target: Backend,
    *,
    generation: GenerationSpec,
    fitted: FittedMap | None = None,
    concepts: Sequence[ConceptPair] = (),
    progress: Progress | None = None,
) -> CarriedPersona:
    """``persona`` on ``target``, carried from ``source`` by ``method``.

    ``fitted`` is the map the method goes through (``FittedMaps.for_method``, or the stored map of
    that kind): a learned method applies it, the others take target blocks and norm calibration
    from it when given. ``concepts`` feed the concept adapter; ``generation`` is how the source
    writes the generated method's contrast (``GenerationSpec.server_default`` on the server);
    ``progress`` hears the generated method's fraction done."""
    if drives_models(method):
        return await carry_by_generation(
            source,
            target,
            persona.vectors,
            persona.default_strength,
            persona.default_positions,
            generation,
            progress=progress,
        )
    shapes = model_shape(source.info), model_shape(target.info)
    return CarriedPersona(
        map_persona_vectors(method, persona.vectors, *shapes, fitted=fitted, concepts=concepts)
    )
