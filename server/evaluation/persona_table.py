"""The demo's measured proof: each persona's trait score and fluency at -s, 0 and +s on held-out questions."""

from __future__ import annotations

from dataclasses import dataclass

from server.demo.corpus import held_out_questions
from server.demo.models import load_demo_personas
from server.demo.traits import trait_rate
from server.engine.base import Backend
from server.evaluation.strength_sweep import StrengthRow, evaluate_strengths
from server.steering.plan import Positions


@dataclass(frozen=True)
class PersonaVerdict:
    """The demo's targets for one persona: a clear rise at +s, a fall at -s, fluent answers."""

    model: str
    persona: str
    rows: tuple[StrengthRow, ...]  # strengths -s, 0, +s

    @property
    def baseline(self) -> StrengthRow:
        return self.rows[1]

    @property
    def target(self) -> float:
        return max(3 * self.baseline.trait_score, self.baseline.trait_score + 0.2)

    @property
    def raised(self) -> bool:
        return self.rows[2].trait_score >= self.target

    @property
    def lowered(self) -> bool:
        return self.rows[0].trait_score < self.baseline.trait_score

    @property
    def fluent(self) -> bool:
        """Answers at the default strength: perplexity under the unsteered model within 2x, no collapse."""
        steered = self.rows[2]
        return (
            steered.perplexity <= 2 * self.baseline.perplexity
            and steered.collapse_rate <= self.baseline.collapse_rate + 0.05
        )


async def evaluate_demo_model(
    backend: Backend, model: str, samples: int = 4, seed: int = 7
) -> list[PersonaVerdict]:
    verdicts = []
    for draft in load_demo_personas(model):
        strength = draft.default_strength
        rows = await evaluate_strengths(
            backend,
            draft.name,
            draft.vectors,
            [-strength, 0.0, strength],
            held_out_questions(),
            lambda answers, name=draft.name: trait_rate(answers, name),
            samples=samples,
            seed=seed,
            positions=Positions(draft.default_positions),
        )
        verdicts.append(PersonaVerdict(model, draft.name, tuple(rows)))
    return verdicts


def format_table(verdicts: list[PersonaVerdict]) -> str:
    lines = [
        "| model | persona | strength | trait score | perplexity | distinct-2 | collapse | target met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for verdict in verdicts:
        for index, row in enumerate(verdict.rows):
            met = {0: verdict.lowered, 1: True, 2: verdict.raised and verdict.fluent}[index]
            check = {0: "lower", 1: "baseline", 2: f">= {verdict.target:.2f} and fluent"}[index]
            lines.append(
                f"| {verdict.model} | {verdict.persona} | {row.strength:+.1f} | {row.trait_score:.3f} | "
                f"{row.perplexity:.2f} | {row.distinct_2:.3f} | {row.collapse_rate:.3f} | "
                f"{check}: {'yes' if met else 'NO'} |"
            )
    return "\n".join(lines)
