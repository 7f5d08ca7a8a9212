"""The scale of a carried persona's vectors, chosen on the target without its native persona, so
that the source's default strength (and any strength, as the design asks) moves the target about as
much as it moves the source.

A carried vector's norm says little about how hard it pushes the target: at the source's default
strength, personas carried between the demo models ranged from barely visible to 15x the unsteered
perplexity. So the target answers prompts with the vectors at a ladder of scales (at the source's
default strength), each answer read back unsteered as its own answer, and two things are measured
per step: the effect, the answers' shift along the carried persona over the shift the source's
steered answers showed the target (1.0 = the target writes as far into the persona as the source
did), and the perplexity of the answers under the unsteered target over that of its unsteered
answers. The scale is the first step whose effect reaches the source's while perplexity stays within
the bar the demo personas' defaults were calibrated with; failing that, the strongest step within
the bar (the weakest step when none is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from server.engine.answers import ReadBack, answer_all, ask, written
from server.engine.base import Backend
from server.steering.errors import SteeringError
from server.steering.plan import Positions, SteeringPlan
from server.steering.text_quality import perplexity

# Scales of the norm-calibrated vectors tried, weakest first, in steps of sqrt(2).
SCALE_STEPS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)
# Perplexity over the unsteered answers' that still reads fluently (as the demo personas' defaults).
FLUENT_PERPLEXITY_RATIO = 1.6
# A persona whose own style reads as unlikely to the unsteered model (a pirate's "arr") costs
# perplexity on the source too: the bar is then the source's own ratio with this much room, since a
# bar below it stops the ladder before the target writes as the source does (carried to its own
# model, pirate reached 0.2 of the native effect under every judge with the fixed bar).
SOURCE_PERPLEXITY_ROOM = 1.1


def fluency_bar(source_ratio: float | None) -> float:
    """The perplexity ratio the target's steered answers may reach: the fixed bar, or the persona's
    own cost on the source (its steered over unsteered answers' perplexity, both under the unsteered
    source) with ``SOURCE_PERPLEXITY_ROOM``, whichever is higher."""
    if source_ratio is None or not np.isfinite(source_ratio):
        return FLUENT_PERPLEXITY_RATIO
    return max(FLUENT_PERPLEXITY_RATIO, SOURCE_PERPLEXITY_ROOM * source_ratio)


@dataclass(frozen=True)
class CalibrationStep:
    scale: float
    effect: float  # shift along the persona over the source's shift
    perplexity_ratio: float

    def to_dict(self) -> dict[str, float]:
        return {key: round(value, 4) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class StrengthCalibration:
    scale: float  # applied to the norm-calibrated vectors
    strength: float  # the source's default strength the ladder ran at (the persona's default)
    steps: tuple[CalibrationStep, ...]
    fluency_bar: float = FLUENT_PERPLEXITY_RATIO  # the perplexity ratio the ladder stayed within

    @property
    def predicted_transfer(self) -> float:
        """The share of the source's effect the target reaches at the chosen scale, within [0, 1]:
        a forecast of the trait transfer, read from the target's own answers (no trait scorer, no
        native persona; docs/results/transfer.md shows how well it tracks)."""
        effect = next(step.effect for step in self.steps if step.scale == self.scale)
        return min(max(effect, 0.0), 1.0)

    def to_dict(self) -> dict[str, object]:
        return {
            "scale": self.scale,
            "strength": self.strength,
            "predicted_transfer": round(self.predicted_transfer, 4),
            "fluency_bar": round(self.fluency_bar, 4),
            "steps": [step.to_dict() for step in self.steps],
        }


@dataclass(frozen=True)
class Reading:
    """The target's answers to the calibration prompts, read back unsteered."""

    activations: np.ndarray  # mean block outputs over answer tokens, over all answers: [blocks, hidden]
    perplexity: float


async def _read_own_answers(
    target: Backend, prompts: Sequence[str], plan: SteeringPlan | None, max_tokens: int, seed: int
) -> Reading:
    """The target answers each prompt (steered by ``plan``), then reads its answers back unsteered."""
    requests = [
        ask(prompt, max_tokens=max_tokens, seed=seed + i, steering=plan) for i, prompt in enumerate(prompts)
    ]
    answers = await answer_all(target, requests, read=ReadBack(activations=True, nll=True, only=written))
    read = [answer for answer in answers if written(answer)]
    if not read:
        return Reading(np.zeros(0), float("nan"))
    nll, count = sum(a.nll for a in read), sum(a.nll_tokens for a in read)
    return Reading(np.mean([a.activations for a in read], axis=0), perplexity(nll, count))


def chosen_scale(
    steps: Sequence[CalibrationStep], last: bool, bar: float = FLUENT_PERPLEXITY_RATIO
) -> float | None:
    """The scale once the ladder (so far ``steps``; ``last`` when no step follows) decides it:
    the first step that reaches the source's effect while fluent; else the step before the first
    one past the perplexity bar (stronger steps read worse still), the weakest if that is the first;
    else, at the end, the strongest."""
    step = steps[-1]
    if not step.perplexity_ratio <= bar:  # also a NaN perplexity (no answers)
        return steps[-2].scale if len(steps) > 1 else step.scale
    if step.effect >= 1.0 or last:
        return step.scale
    return None


def _effect(shift: np.ndarray, reference: Mapping[int, np.ndarray]) -> float:
    """Mean over the persona's blocks of the shift's length along the reference over the reference's."""
    if shift.size == 0:
        return 0.0
    return float(np.mean([shift[block] @ ref / (ref @ ref) for block, ref in reference.items()]))


async def read_unsteered(
    target: Backend, prompts: Sequence[str], max_tokens: int = 48, seed: int = 0
) -> Reading:
    """The target's unsteered answers to the calibration prompts: what every step is measured
    against, read once for all the placements a persona is calibrated at."""
    plain = await _read_own_answers(target, prompts, None, max_tokens, seed)
    if plain.activations.size == 0:
        raise SteeringError("the target model wrote no answers to calibrate the persona's scale with")
    return plain


async def calibrate_scale(
    target: Backend,
    vectors: Mapping[int, np.ndarray],
    reference: Mapping[int, np.ndarray],
    source_strength: float,
    positions: str,
    prompts: Sequence[str],
    plain: Reading,
    max_tokens: int = 48,
    seed: int = 0,
    bar: float = FLUENT_PERPLEXITY_RATIO,
) -> StrengthCalibration:
    """The scale for ``vectors`` on ``target`` at ``source_strength``: ``reference`` is, per target
    block, the shift the source's steered answers showed the target (what the persona should reach);
    ``plain`` is ``read_unsteered`` of the same prompts, max_tokens and seed; ``bar`` the perplexity
    ratio a step may reach (``fluency_bar``)."""
    steps: list[CalibrationStep] = []
    for index, scale in enumerate(SCALE_STEPS):
        scaled = {block: vector * scale for block, vector in vectors.items()}
        plan = SteeringPlan(scaled, strength=source_strength, positions=Positions(positions))
        steered = await _read_own_answers(target, prompts, plan, max_tokens, seed)
        shift = steered.activations - plain.activations if steered.activations.size else steered.activations
        step = CalibrationStep(scale, _effect(shift, reference), steered.perplexity / plain.perplexity)
        steps.append(step)
        chosen = chosen_scale(steps, last=index == len(SCALE_STEPS) - 1, bar=bar)
        if chosen is not None:
            return StrengthCalibration(chosen, source_strength, tuple(steps), bar)
    raise AssertionError("the last step always decides")
