"""`persona-server eval --operators`: what ablate and cap undo of a persona pushed too hard.

On each demo model, a persona is added at twice its default strength (its stored positions), and
then, in the same request, capped at the unsteered reading or ablated at the same blocks
(server/steering/operators.py). Each condition answers the held-out questions, sampled at
temperature 1.0, and is scored by the persona's marker words, the style classifier (trained apart
from every model) and its reading, with the perplexity of its answers under the unsteered model.
The cap's bound is what a user can know without the model's internals: the mean reading
(``persona_scores``) of the unsteered answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from persona_store.records import PersonaDraft
from server.demo.corpus import held_out_questions
from server.demo.traits import shows_trait
from server.engine.answers import Answer, ReadBack, answer_all, ask, written
from server.engine.base import Backend
from server.evaluation.strength_sweep import question_seeds
from server.evaluation.style_classifier import style_scores
from server.serving.monitoring import persona_scores, unit_monitor
from server.steering.plan import EditTerm, Positions, SteeringPlan
from server.steering.text_quality import collapsed, perplexity

PUSH = 2.0  # the pushed persona's strength, in multiples of its default
CONDITIONS = ("unsteered", "default", "pushed", "pushed + cap", "pushed + ablate")


@dataclass(frozen=True)
class OperatorRow:
    model: str
    persona: str
    condition: str
    markers: float  # share of answers with a marker word
    classifier: float  # mean probability of the persona's pole
    reading: float  # mean persona_scores reading
    perplexity_ratio: float  # under the unsteered model, over the unsteered answers'
    collapsed: float  # share of answers collapsed into repetition or empty
    cap: float | None = None  # the cap's max (the unsteered mean reading)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def condition_plans(persona: PersonaDraft, cap_max: float) -> dict[str, SteeringPlan | None]:
    """Each condition's plan: the persona pushed, then capped or ablated at the same blocks."""
    vectors, strength = dict(persona.vectors), persona.default_strength
    positions = Positions(persona.default_positions)
    pushed = (vectors, PUSH * strength)
    return {
        "unsteered": None,
        "default": SteeringPlan(vectors, strength, positions),
        "pushed": SteeringPlan.compose([pushed], positions),
        "pushed + cap": SteeringPlan.compose([pushed, EditTerm(vectors, 0.0, -math.inf, cap_max)], positions),
        "pushed + ablate": SteeringPlan.compose([pushed, EditTerm(vectors, 1.0)], positions),
    }


async def _answers(backend: Backend, plan: SteeringPlan | None, samples: int, seed: int) -> list[Answer]:
    requests = [
        ask(question, max_tokens=48, temperature=1.0, seed=s, steering=plan)
        for question, s in question_seeds(held_out_questions(), samples, seed)
    ]
    return await answer_all(
        backend, requests, concurrency=32, read=ReadBack(activations=True, nll=True, only=written)
    )


def _scored(answers: Sequence[Answer], persona: PersonaDraft) -> dict[str, float]:
    monitor = unit_monitor(persona.name, persona.vectors)
    read = [a for a in answers if written(a)]
    texts = [a.text for a in answers]
    return {
        "markers": float(np.mean([shows_trait(text, persona.name) for text in texts])),
        "classifier": float(np.mean(style_scores(texts, persona.name))),
        "reading": float(np.mean([persona_scores(a.activations, [monitor])[persona.name] for a in read])),
        "perplexity": perplexity(sum(a.nll for a in read), sum(a.nll_tokens for a in read)),
        "collapsed": float(np.mean([not written(a) or collapsed(a.text.lower().split()) for a in answers])),
    }


async def operator_rows(
    backend: Backend,
    model: str,
    persona: PersonaDraft,
    samples: int = 4,
    seed: int = 31,
    progress: Callable[[str], None] | None = None,
) -> list[OperatorRow]:
    """The five conditions of ``persona`` on ``model``, scored."""
    plain = _scored(await _answers(backend, None, samples, seed), persona)
    cap_max = plain["reading"]
    rows = []
    for condition, plan in condition_plans(persona, cap_max).items():
        if progress is not None:
            progress(f"{model} {persona.name}: {condition}")
        scored = plain if plan is None else _scored(await _answers(backend, plan, samples, seed), persona)
        rows.append(
            OperatorRow(
                model,
                persona.name,
                condition,
                scored["markers"],
                scored["classifier"],
                scored["reading"],
                scored["perplexity"] / plain["perplexity"],
                scored["collapsed"],
                cap_max if condition == "pushed + cap" else None,
            )
        )
    return rows


def format_operator_table(rows: Sequence[OperatorRow]) -> str:
    lines = [
        f"pushed = {PUSH:g}x the default strength; cap max = the unsteered mean reading",
        "",
        "| model | persona | condition | markers | style classifier | reading | perplexity / unsteered "
        "| collapsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        condition = row.condition if row.cap is None else f"{row.condition} (max {row.cap:.3g})"
        lines.append(
            f"| {row.model} | {row.persona} | {condition} | {row.markers:.2f} | {row.classifier:.2f} | "
            f"{row.reading:.3g} | {row.perplexity_ratio:.2f} | {row.collapsed:.2f} |"
        )
    return "\n".join(lines)
