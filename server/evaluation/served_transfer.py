"""Transfer on the path users call, under judges the mapping method was not developed against.

Each demo persona is carried from every demo model to every other one exactly as the server's map
request with its defaults carries it (``GenerationSpec.server_default`` of the server's fitting corpus,
the request's default method; the persona known only by its vectors, default strength and positions),
then used as the store then holds it: the carried vectors at the stored default strength (the
source's). On the target, three conditions answer the demo's held-out questions, sampled at
temperature 1.0 (as users sample) and greedy: unsteered, the target's own native persona at its
default strength, and the carried persona.

Three judges, agreed before the run, score every answer:
- ``markers``: the persona's marker words (``server.demo.traits``);
- ``native reading``: the projection of the answer, read back by the unsteered target, on the
  target's own native persona vector (what ``persona_scores`` reports), which the map never sees;
- ``style classifier``: a classifier trained on texts the demo corpus' generator writes afresh
  (``style_classifier.py``), which sees neither marker lists nor any model.

Transfer under a judge is (carried - unsteered) / (native - unsteered) of the mean scores, with a
95% bootstrap interval over questions; an overshoot counts as 1.0, and an answer that collapsed
into repetition (or is empty) counts as showing no trait (the unsteered mean). The questions are
split in two fixed halves: the development half (what the method may be improved on) and the
held-out half (what is reported).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from persona_store.records import PersonaDraft
from server.admin.fitting_corpus import DEMO_CORPUS, FittingCorpus
from server.demo.corpus import held_out_questions
from server.demo.models import DEMO_MODEL_NAMES
from server.demo.traits import shows_trait
from server.engine.answers import Answer, ReadBack, answer_all, ask, written
from server.engine.base import Backend
from server.evaluation.intervals import Interval, mean_interval, transfer_interval
from server.evaluation.strength_sweep import question_seeds
from server.evaluation.style_classifier import style_scores
from server.evaluation.transfer_table import demo_personas, persona_directions
from server.serving.monitoring import persona_scores, unit_monitor
from server.steering.mapping import DEFAULT_METHOD
from server.steering.plan import Positions, SteeringPlan
from server.steering.text_quality import collapsed, perplexity
from server.transfer.carry import CarriedPersona, GenerationSpec, SourcePersona, carry_persona

JUDGES = ("markers", "native reading", "style classifier")
SAMPLINGS = ("T=1.0", "greedy")
HALVES = ("held-out", "development")
OVERSHOOT_CAP = 1.0
# The bars, on the held-out half under every judge: the mean over all cells, every cell, and
# the carried persona's perplexity under the unsteered target against the native persona's.
MEAN_TARGET, CELL_TARGET, PERPLEXITY_TARGET = 0.80, 0.60, 1.10

Key = tuple[str, str, str]  # (half, sampling, judge)


# The held-out questions in two fixed halves, alternating over the sorted topics: which rows of a
# [question, sample] grid each half holds.
HALF_ROWS = {"development": slice(0, None, 2), "held-out": slice(1, None, 2)}


def question_halves() -> dict[str, list[str]]:
    questions = held_out_questions()
    return {half: questions[rows] for half, rows in HALF_ROWS.items()}


def served_generation() -> GenerationSpec:
    """What the server's map request uses with the shipped fitting corpus (``PersonaMapper``)."""
    return GenerationSpec.server_default(FittingCorpus.load(DEMO_CORPUS).texts)


@dataclass(frozen=True)
class ServedRun:
    samples: int = 4  # answers per question at temperature 1.0 (greedy: one)
    max_tokens: int = 48
    personas: tuple[str, ...] | None = None  # None: every demo persona
    seed: int = 23


@dataclass(frozen=True)
class Scored:
    """One condition's answers to all the questions: per judge and sampling, the scores laid out
    [question, sample]; which answers collapsed; the likelihood under the unsteered target."""

    scores: dict[tuple[str, str], np.ndarray]  # (sampling, judge) -> [questions, samples]
    degenerate: dict[str, np.ndarray]  # sampling -> [questions, samples]: collapsed or empty
    nll: dict[str, np.ndarray]  # sampling -> [questions, samples] summed nll
    tokens: dict[str, np.ndarray]

    def perplexity(self, sampling: str, rows: slice) -> float:
        return perplexity(float(self.nll[sampling][rows].sum()), int(self.tokens[sampling][rows].sum()))


@dataclass(frozen=True)
class ServedCell:
    source: str
    target: str
    persona: str
    transfer: dict[Key, Interval]
    perplexity_ratio: dict[tuple[str, str], float]  # (half, sampling): carried / native
    predicted: float | None  # the calibration's forecast
    blocks: tuple[int, ...]  # where the carried persona landed
    native_shift: dict[Key, float] = field(default_factory=dict)  # native - unsteered, per judge

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "target": self.target,
            "persona": self.persona,
            "blocks": list(self.blocks),
            "predicted_transfer": self.predicted,
            "transfer": [
                {"half": h, "sampling": s, "judge": j, **interval.__dict__}
                for (h, s, j), interval in self.transfer.items()
            ],
            "perplexity_ratio": [
                {"half": h, "sampling": s, "ratio": r} for (h, s), r in self.perplexity_ratio.items()
            ],
            "native_shift": [
                {"half": h, "sampling": s, "judge": j, "shift": v}
                for (h, s, j), v in self.native_shift.items()
            ],
        }


class TargetJudge:
    """Answers and scores conditions on one target for one persona, with the target's native persona
    as the reading judge; the unsteered and native conditions are answered once and kept."""

    def __init__(self, backend: Backend, native: PersonaDraft, run: ServedRun) -> None:
        self._backend = backend
        self._native = native
        self._monitor = unit_monitor(native.name, native.vectors)
        self._run = run
        self._questions = held_out_questions()
        self.unsteered: Scored | None = None
        self.native: Scored | None = None

    async def prepare(self) -> None:
        if self.unsteered is None:
            self.unsteered = await self.score(None)
            native = self._native
            plan = SteeringPlan(
                dict(native.vectors), native.default_strength, Positions(native.default_positions)
            )
            self.native = await self.score(plan)

    async def score(self, plan: SteeringPlan | None) -> Scored:
        scores: dict[tuple[str, str], np.ndarray] = {}
        degenerate, nll, tokens = {}, {}, {}
        for sampling in SAMPLINGS:
            samples = self._run.samples if sampling == "T=1.0" else 1
            temperature = 1.0 if sampling == "T=1.0" else 0.0
            requests = [
                ask(q, max_tokens=self._run.max_tokens, temperature=temperature, seed=s, steering=plan)
                for q, s in question_seeds(self._questions, samples, self._run.seed)
            ]
            answers = await answer_all(
                self._backend,
                requests,
                concurrency=32,
                read=ReadBack(activations=True, nll=True, only=written),
            )
            shape = (len(self._questions), samples)
            for judge, values in self._judged(answers).items():
                scores[(sampling, judge)] = np.asarray(values, dtype=np.float64).reshape(shape)
            degenerate[sampling] = np.array(
                [not written(a) or collapsed(a.text.lower().split()) for a in answers]
            ).reshape(shape)
            nll[sampling] = np.array([a.nll for a in answers]).reshape(shape)
            tokens[sampling] = np.array([a.nll_tokens for a in answers]).reshape(shape)
        return Scored(scores, degenerate, nll, tokens)

    def _judged(self, answers: Sequence[Answer]) -> dict[str, list[float]]:
        texts = [a.text for a in answers]
        reading = [
            persona_scores(a.activations, [self._monitor])[self._native.name]
            if a.activations is not None
            else np.nan
            for a in answers
        ]
        return {
            "markers": [float(shows_trait(text, self._native.name)) for text in texts],
            "native reading": reading,
            "style classifier": style_scores(texts, self._native.name),
        }


def _no_trait_where_degenerate(condition: Scored, unsteered: Scored, sampling: str, judge: str) -> np.ndarray:
    """The condition's scores with collapsed or empty answers counted as showing no trait."""
    baseline = float(np.nanmean(unsteered.scores[(sampling, judge)]))
    scores = condition.scores[(sampling, judge)].copy()
    scores[condition.degenerate[sampling] | np.isnan(scores)] = baseline
    return scores


def compare(
    carried: Scored, judge_of: TargetJudge
) -> tuple[dict[Key, Interval], dict[Key, float], dict[tuple[str, str], float]]:
    """Transfer and the native shift per (half, sampling, judge); the perplexity ratio per (half,
    sampling)."""
    assert judge_of.unsteered is not None and judge_of.native is not None
    unsteered, native = judge_of.unsteered, judge_of.native
    transfer: dict[Key, Interval] = {}
    shifts: dict[Key, float] = {}
    ratios: dict[tuple[str, str], float] = {}
    for half_name, rows in HALF_ROWS.items():
        for sampling in SAMPLINGS:
            ratios[(half_name, sampling)] = carried.perplexity(sampling, rows) / native.perplexity(
                sampling, rows
            )
            for judge in JUDGES:
                grids = [
                    _no_trait_where_degenerate(c, unsteered, sampling, judge)[rows]
                    for c in (carried, unsteered, native)
                ]
                questions = grids[0].shape[0]
                transfer[(half_name, sampling, judge)] = transfer_interval(
                    *(g.ravel() for g in grids), questions, overshoot_cap=OVERSHOOT_CAP
                )
                shifts[(half_name, sampling, judge)] = float(grids[2].mean() - grids[1].mean())
    return transfer, shifts, ratios


async def carry_as_served(source: Backend, target: Backend, persona: PersonaDraft) -> CarriedPersona:
    """The persona carried exactly as the map request with its defaults carries it."""
    known_by_vectors = SourcePersona(persona.vectors, persona.default_strength, persona.default_positions)
    return await carry_persona(
        DEFAULT_METHOD, known_by_vectors, source, target, generation=served_generation()
    )


async def served_cell(
    source: tuple[str, Backend], target: tuple[str, Backend], persona: PersonaDraft, judge: TargetJudge
) -> ServedCell:
    """One persona carried from ``source`` to ``target`` and scored there."""
    carried = await carry_as_served(source[1], target[1], persona)
    return await scored_cell(source[0], target[0], persona, carried, judge)


async def scored_cell(
    source: str, target: str, persona: PersonaDraft, carried: CarriedPersona, judge: TargetJudge
) -> ServedCell:
    """The carried persona scored on the target at the stored default strength (the source's)."""
    await judge.prepare()
    plan = SteeringPlan(dict(carried.vectors), persona.default_strength, Positions(persona.default_positions))
    transfer, shifts, ratios = compare(await judge.score(plan), judge)
    blocks = tuple(sorted(carried.vectors))
    return ServedCell(
        source, target, persona.name, transfer, ratios, carried.predicted_transfer, blocks, shifts
    )


async def served_transfer_table(
    backends: dict[str, Backend],
    run: ServedRun = ServedRun(),
    progress: Callable[[str], None] | None = None,
    models: tuple[str, ...] = DEMO_MODEL_NAMES,
) -> list[ServedCell]:
    personas = demo_personas(models)
    judges: dict[tuple[str, str], TargetJudge] = {}
    cells = []
    for source, target, persona in persona_directions(personas, run.personas, progress):
        native = personas[target][persona.name]
        judge = judges.setdefault((target, persona.name), TargetJudge(backends[target], native, run))
        cells.append(
            await served_cell((source, backends[source]), (target, backends[target]), persona, judge)
        )
    return cells


def _text(interval: Interval) -> str:
    return f"{interval.estimate:.2f}"


def _cell_lines(cells: list[ServedCell], half: str) -> list[str]:
    lines: list[str] = []
    label = "reported" if half == "held-out" else "used while improving the method"
    lines += [
        f"### {half} half ({label}): transfer at the stored default strength, each judge",
        "",
        "| source -> target | persona | "
        + " | ".join(f"{j} {s}" for s in SAMPLINGS for j in JUDGES)
        + " | perplexity carried / native (T=1.0) | forecast |",
        "|---|---|" + "---|" * (len(JUDGES) * len(SAMPLINGS) + 2),
    ]
    for c in cells:
        values = " | ".join(_text(c.transfer[(half, s, j)]) for s in SAMPLINGS for j in JUDGES)
        forecast = "" if c.predicted is None else f"{c.predicted:.2f}"
        lines.append(
            f"| {c.source} -> {c.target} | {c.persona} | {values} | "
            f"{c.perplexity_ratio[(half, 'T=1.0')]:.2f} | {forecast} |"
        )
    lines.append("")
    return lines


def _summary_lines(cells: list[ServedCell]) -> list[str]:
    lines = [
        "### summary: mean over the cells [95% CI], the weakest cell, cells at or above "
        f"{CELL_TARGET} (targets on the held-out half: mean >= {MEAN_TARGET}, every cell >= {CELL_TARGET})",
        "",
        "| half | sampling | judge | mean [95% CI] | weakest cell | cells >= 0.6 | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for half in HALVES:
        for sampling in SAMPLINGS:
            for judge in JUDGES:
                intervals = [c.transfer[(half, sampling, judge)] for c in cells]
                mean = mean_interval(intervals)
                estimates = np.array([i.estimate for i in intervals])
                weakest = float(np.nanmin(estimates)) if np.isfinite(estimates).any() else float("nan")
                met = mean.estimate >= MEAN_TARGET and bool(np.all(estimates >= CELL_TARGET))
                verdict = ("met" if met else "missed") if half == "held-out" else ""
                ci = f"{mean.estimate:.2f} [{mean.low:.2f}, {mean.high:.2f}]"
                passing = f"{int(np.sum(estimates >= CELL_TARGET))}/{len(cells)}"
                lines.append(
                    f"| {half} | {sampling} | {judge} | {ci} | {weakest:.2f} | {passing} | {verdict} |"
                )
    return lines


def format_served_table(cells: list[ServedCell]) -> str:
    lines: list[str] = []
    for half in HALVES:
        lines += _cell_lines(cells, half)
    lines += _summary_lines(cells)
    ratios = [c.perplexity_ratio[("held-out", "T=1.0")] for c in cells]
    within = sum(r <= PERPLEXITY_TARGET for r in ratios)
    lines += [
        "",
        f"Perplexity under the unsteered target, carried / native, held-out half at T=1.0: median "
        f"{np.median(ratios):.2f}, worst {max(ratios):.2f}; within {PERPLEXITY_TARGET:.2f}x in "
        f"{within}/{len(cells)} cells.",
    ]
    forecasts = [
        (c.predicted, c.transfer[("held-out", "T=1.0", "native reading")].estimate)
        for c in cells
        if c.predicted is not None
    ]
    if len(forecasts) > 2:
        predicted, measured = np.array(forecasts).T
        if np.std(predicted) > 0 and np.std(measured) > 0:
            lines.append(
                f"The calibration's forecast against the native reading's transfer (held-out, T=1.0): "
                f"Pearson r = {np.corrcoef(predicted, measured)[0, 1]:.2f} over {len(forecasts)} cells."
            )
    return "\n".join(lines)
