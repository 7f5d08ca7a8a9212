"""The transfer table: how much of a persona's trait shift survives being mapped to another demo model.

The protocol, leave-one-persona-out: for every ordered pair of demo models and every persona P of
the source, the maps are fitted on neutral texts that hold nothing of P's style (the corpus' touches
of the other personas' styles stay, so the map still sees directions of style), and the concept
adapter learns from the other personas only. P is then carried to the target by each method through
the very function the server's map endpoint calls (``server.transfer.carry.carry_persona``).

On the target's held-out questions, each condition is scored with the source persona's positions
at 1/4 to 4 times the mapped persona's stored default strength (the source's; the generated method
calibrates the scale of its vectors instead): the 1x row is what a user gets by naming it, the best
coherent row (perplexity under the unsteered target within 2x, no more collapse than the native
persona) is what the map can do. The native persona runs at its own default strength. "Transfer"
is the condition's trait shift over the native persona's shift on the target, with a 95% bootstrap
interval over questions and samples (``intervals.py``); overshoot counts as 1.0.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import numpy as np

from persona_store.records import PersonaDraft
from server.demo.corpus import held_out_questions, neutral_texts, training_questions
from server.demo.models import DEMO_MODEL_NAMES, load_demo_personas
from server.demo.traits import trait_rate
from server.engine.base import Backend
from server.evaluation.intervals import Interval, mean_interval, transfer_interval
from server.evaluation.strength_sweep import StrengthRow, evaluate_strengths
from server.steering.errors import SteeringError
from server.steering.mapping import MappingMethod, corresponding_layer
from server.steering.plan import Positions
from server.transfer.carry import CarriedPersona, GenerationSpec, SourcePersona, carry_persona, drives_models
from server.transfer.maps import FittedMaps, fit_maps

CONDITIONS = ("none", "native", *(method.value for method in MappingMethod))
# Multiples of the source persona's default strength tried for a mapped vector; 1.0 is its stored
# default. Below 1: a mapped vector may need less push than the native one to stay coherent.
SWEEP = (0.25, 0.5, 1.0, 2.0, 4.0)
OVERSHOOT_CAP = 1.0
# What the generated method's source answers: the demo's training questions, never the held-out ones.
GENERATION = GenerationSpec(prompts=tuple(question for _, question in training_questions()), seed=7)


def _fluent(row: StrengthRow, baseline: StrengthRow, native: StrengthRow) -> bool:
    """The coherence bar: perplexity under the unsteered target within 2x, no more collapse than the
    native persona (with the noise of a few answers)."""
    collapse_bar = max(baseline.collapse_rate, native.collapse_rate) + 0.05
    return row.perplexity <= 2 * baseline.perplexity and row.collapse_rate <= collapse_bar


@dataclass(frozen=True)
class TransferRun:
    """What one run of the table measures."""

    samples: int = 2  # answers per held-out question and strength
    methods: tuple[MappingMethod, ...] = tuple(MappingMethod)
    multiples: tuple[float, ...] = SWEEP  # of the stored default; (1.0,): the stored default only
    personas: tuple[str, ...] | None = None  # None: every persona of the source

    def __post_init__(self) -> None:
        if 1.0 not in self.multiples:
            raise ValueError("the strengths tried must include the stored default (1.0)")


@dataclass(frozen=True)
class TransferRow:
    source: str
    target: str
    persona: str
    condition: str
    at_default: StrengthRow  # the mapped persona at its stored default strength (1x)
    best: StrengthRow  # the strongest coherent row of the sweep (the 1x row if none is coherent)
    default_transfer: Interval
    best_transfer: Interval
    predicted: float | None = None  # the method's own forecast of transfer at default, if it has one


class _Activations:
    """Each model's block outputs on each leave-one-persona-out corpus, read once."""

    def __init__(self, backends: dict[str, Backend]) -> None:
        self._backends = backends
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    async def get(self, model: str, left_out: str) -> np.ndarray:
        key = (model, left_out)
        if key not in self._cache:
            self._cache[key] = await self._backends[model].text_activations(neutral_texts(without=[left_out]))
        return self._cache[key]


DemoPersonas = dict[str, dict[str, PersonaDraft]]  # model -> persona name -> its shipped persona


def demo_personas(models: tuple[str, ...]) -> DemoPersonas:
    return {model: {p.name: p for p in load_demo_personas(model)} for model in models}


def persona_directions(
    personas: DemoPersonas, only: tuple[str, ...] | None, progress: Callable[[str], None] | None
) -> Iterator[tuple[str, str, PersonaDraft]]:
    """Every (source, target, persona of the source) over the ordered pairs of models, ``only`` these
    personas if given, each announced to ``progress``."""
    for source, target in itertools.permutations(personas, 2):
        for name, persona in personas[source].items():
            if only is not None and name not in only:
                continue
            if progress is not None:
                progress(f"{source} -> {target}: {name}")
            yield source, target, persona


async def transfer_table(
    backends: dict[str, Backend],
    run: TransferRun = TransferRun(),
    progress: Callable[[str], None] | None = None,
    models: tuple[str, ...] = DEMO_MODEL_NAMES,
) -> list[TransferRow]:
    activations = _Activations(backends)
    personas = demo_personas(models)
    questions = held_out_questions()
    rows: list[TransferRow] = []
    for source, target, persona in persona_directions(personas, run.personas, progress):
        name = persona.name
        maps = None
        if not all(drives_models(method) for method in run.methods):  # a method needs fitted maps
            xs, ys = await activations.get(source, name), await activations.get(target, name)
            layer_map = {b: corresponding_layer(b, xs.shape[2], ys.shape[2]) for b in range(xs.shape[2])}
            maps = fit_maps(xs, ys, layer_map)  # as a fit with the server's defaults (mean over tokens)
        others = [(personas[source][o], personas[target][o]) for o in personas[source] if o != name]
        rows += await _cell(
            (backends[source], backends[target]),
            source,
            target,
            persona,
            personas[target][name],
            maps,
            others,
            questions,
            run,
        )
    return rows


async def _carried(
    method: MappingMethod,
    persona: PersonaDraft,
    engines: tuple[Backend, Backend],
    maps: FittedMaps | None,
    others: list[tuple[PersonaDraft, PersonaDraft]],
) -> CarriedPersona | None:
    """The persona carried exactly as the server's map request carries it (the generated method's
    source answers training questions only); None where the method maps none of its blocks (e.g.
    the concept adapter with no other persona at these blocks)."""
    source = SourcePersona(persona.vectors, persona.default_strength, persona.default_positions)
    fitted = None if maps is None else maps.for_method(method)
    concepts = [(a.vectors, b.vectors) for a, b in others]
    try:
        return await carry_persona(
            method, source, *engines, generation=GENERATION, fitted=fitted, concepts=concepts
        )
    except SteeringError:
        if drives_models(method):
            raise
        return None


Sweep = Callable[[dict[int, np.ndarray], list[float], Positions], Awaitable[list[StrengthRow]]]


def _sweeper(backend: Backend, name: str, questions: list[str], run: TransferRun) -> Sweep:
    """Strength sweeps of one persona's vectors on the target, scored by the trait's marker words."""
    score = lambda answers: trait_rate(answers, name)  # noqa: E731

    async def sweep(
        vectors: dict[int, np.ndarray], strengths: list[float], positions: Positions
    ) -> list[StrengthRow]:
        return await evaluate_strengths(
            backend,
            name,
            vectors,
            strengths,
            questions,
            score,
            samples=run.samples,
            seed=11,
            positions=positions,
        )

    return sweep


def _rows(
    cell: tuple[str, str, str],
    measured: dict[str, tuple[StrengthRow, StrengthRow]],
    predicted: dict[str, float],
    questions: list[str],
) -> list[TransferRow]:
    """One row per condition, with the transfer intervals against the cell's baseline and native rows."""
    baseline, native_row = measured["none"][0], measured["native"][0]

    def interval(row: StrengthRow) -> Interval:
        return transfer_interval(
            row.answer_scores,
            baseline.answer_scores,
            native_row.answer_scores,
            len(questions),
            overshoot_cap=OVERSHOOT_CAP,
        )

    rows = []
    for condition, (at_default, best) in measured.items():
        intervals = interval(at_default), interval(best)
        rows.append(TransferRow(*cell, condition, at_default, best, *intervals, predicted.get(condition)))
    return rows


async def _cell(
    engines: tuple[Backend, Backend],
    source: str,
    target: str,
    persona: PersonaDraft,
    native: PersonaDraft,
    maps: FittedMaps | None,
    others: list[tuple[PersonaDraft, PersonaDraft]],
    questions: list[str],
    run: TransferRun,
) -> list[TransferRow]:
    """Every condition of one persona carried from ``source`` to ``target``."""
    sweep = _sweeper(engines[1], persona.name, questions, run)
    baseline = (await sweep(native.vectors, [0.0], Positions.ALL))[0]
    native_row = (
        await sweep(native.vectors, [native.default_strength], Positions(native.default_positions))
    )[0]
    predicted: dict[str, float] = {}
    measured: dict[str, tuple[StrengthRow, StrengthRow]] = {
        "none": (baseline, baseline),
        "native": (native_row, native_row),
    }
    at_default = run.multiples.index(1.0)
    for method in run.methods:
        carried = await _carried(method, persona, engines, maps, others)
        if carried is None:
            continue  # the cell has no row for this method; the summary counts cells per method
        if carried.predicted_transfer is not None:
            predicted[method.value] = carried.predicted_transfer
        strengths = [f * persona.default_strength for f in run.multiples]  # a mapped persona keeps it
        tried = await sweep(carried.vectors, strengths, Positions(persona.default_positions))
        fluent = [row for row in tried if _fluent(row, baseline, native_row)] or [tried[at_default]]
        measured[method.value] = (tried[at_default], max(fluent, key=lambda row: row.trait_score))
    return _rows((source, target, persona.name), measured, predicted, questions)


def _cell_text(interval: Interval) -> str:
    return f"{interval.estimate:.2f} [{interval.low:.2f}, {interval.high:.2f}]"


def format_transfer_table(rows: list[TransferRow]) -> str:
    """One line per cell and condition, then each method's mean over the cells."""
    lines = [
        "| source -> target | persona | condition | transfer at default [95% CI] | best coherent [95% CI] "
        "| best strength | trait at default | perplexity at default | collapse at default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.source} -> {r.target} | {r.persona} | {r.condition} | {_cell_text(r.default_transfer)} | "
            f"{_cell_text(r.best_transfer)} | {r.best.strength:g} | {r.at_default.trait_score:.3f} | "
            f"{r.at_default.perplexity:.2f} | {r.at_default.collapse_rate:.3f} |"
        )
    lines += [
        "",
        "| condition | mean transfer at default [95% CI] | mean best coherent [95% CI] | cells |",
        "|---|---|---|---|",
    ]
    for condition in CONDITIONS[2:]:
        chosen = [r for r in rows if r.condition == condition]
        if not chosen:
            continue
        at_default = _cell_text(mean_interval([r.default_transfer for r in chosen]))
        best = _cell_text(mean_interval([r.best_transfer for r in chosen]))
        lines.append(f"| {condition} | {at_default} | {best} | {len(chosen)} |")
    forecasts = [(r.predicted, r.default_transfer.estimate) for r in rows if r.predicted is not None]
    if len(forecasts) > 2:
        predicted, measured = np.array(forecasts).T
        lines += [
            "",
            f"Predicted transfer (the calibration's effect) against measured, {len(forecasts)} cells: "
            f"Pearson r = {np.corrcoef(predicted, measured)[0, 1]:.2f}, mean absolute error "
            f"{np.mean(np.abs(predicted - measured)):.2f}.",
        ]
    return "\n".join(lines)


def transfer_record(row: TransferRow) -> dict[str, object]:
    """A row as JSON: the best coherent row's measures (what the plot draws) and both transfers."""
    return {
        "source": row.source,
        "target": row.target,
        "condition": row.condition,
        "transfer": row.best_transfer.estimate,
        "transfer_low": row.best_transfer.low,
        "transfer_high": row.best_transfer.high,
        "transfer_at_default": row.default_transfer.estimate,
        "transfer_at_default_low": row.default_transfer.low,
        "transfer_at_default_high": row.default_transfer.high,
        "predicted_transfer": row.predicted,
        "at_default": row.at_default.to_dict(),
        **row.best.to_dict(),
    }
