"""How much of a demo persona a bake keeps: `persona-server eval --bake`.

For each demo model and persona, on the held-out questions (never a bake prompt): the unsteered
model, the model steered at the persona's default strength, and the persona baked at several LoRA
ranks and numbers of trajectories. Each row: the trait score (share of answers showing the trait),
the retention (baked shift over steered shift of the trait score, with a 95% bootstrap interval over
questions and samples) and the perplexity of the answers under the unsteered model.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_store.arrays import vectors_checksum
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord
from server.admin.fitting_corpus import DEMO_CORPUS, FittingCorpus
from server.baking.bake import BakeOrder, bake_persona
from server.baking.distill import BakeSpec
from server.demo.corpus import held_out_questions
from server.demo.models import demo_model_dir, load_demo_personas
from server.demo.traits import trait_rate
from server.engine.base import Backend
from server.engine.registry import load_backend
from server.evaluation.intervals import Interval, transfer_interval
from server.evaluation.strength_sweep import StrengthRow, evaluate_strengths

RANKS = (8, 16, 32)
TRAJECTORY_COUNTS = (50, 100, 200, 500)
DEFAULT_RANK, DEFAULT_TRAJECTORIES = 32, 200


@dataclass(frozen=True)
class BakeRun:
    samples: int = 4
    steps: int = 300
    ranks: Sequence[int] = RANKS
    trajectory_counts: Sequence[int] = TRAJECTORY_COUNTS


@dataclass(frozen=True)
class BakeCell:
    model: str
    persona: str
    condition: str  # unsteered | steered | baked
    rank: int | None
    trajectories: int | None
    row: StrengthRow
    retention: Interval | None  # baked rows only
    perplexity_ratio: float  # over the steered answers' perplexity

    def to_dict(self) -> dict[str, Any]:
        retention = None if self.retention is None else self.retention.__dict__
        return {
            "model": self.model,
            "persona": self.persona,
            "condition": self.condition,
            "rank": self.rank,
            "trajectories": self.trajectories,
            **self.row.to_dict(),
            "retention": retention,
            "perplexity_ratio": self.perplexity_ratio,
        }


def _configurations(run: BakeRun) -> list[tuple[int, int]]:
    """Every rank at the default trajectories, then every trajectory count at the default rank."""
    chosen = [(rank, DEFAULT_TRAJECTORIES) for rank in run.ranks]
    chosen += [
        (DEFAULT_RANK, count) for count in run.trajectory_counts if (DEFAULT_RANK, count) not in chosen
    ]
    return chosen


async def _measure(
    backend: Backend,
    name: str,
    vectors: Any,
    strength: float,
    positions: Any,
    run: BakeRun,
    judge: Backend | None = None,
) -> StrengthRow:
    rows = await evaluate_strengths(
        backend,
        name,
        vectors,
        [strength],
        held_out_questions(),
        lambda answers: trait_rate(answers, name),
        samples=run.samples,
        seed=11,
        positions=positions,
        judge=judge,
    )
    return rows[0]


def _record(draft: PersonaDraft) -> PersonaRecord:
    """The shipped demo persona as the store would hand it out (version 1)."""
    info = PersonaInfo(
        model=draft.model,
        name=draft.name,
        layers=tuple(sorted(draft.vectors)),
        hidden_size=draft.hidden_size,
        default_strength=draft.default_strength,
        description=draft.description,
        provenance=draft.provenance,
        version=1,
        created_at=0.0,
        checksum=vectors_checksum(draft.vectors),
        default_positions=draft.default_positions,
    )
    return PersonaRecord(info=info, vectors=dict(draft.vectors))


async def _load(folder: Path, model_id: str) -> Backend:
    return await asyncio.to_thread(load_backend, folder, model_id)


async def persona_bake_cells(
    base: Backend, model: str, persona: str, run: BakeRun, progress: Callable[[str], None] | None = None
) -> list[BakeCell]:
    draft = next(d for d in load_demo_personas(model) if d.name == persona)
    record = _record(draft)
    with tempfile.TemporaryDirectory() as scratch:
        vectors, positions = draft.vectors, draft.default_positions
        plain = await _measure(base, persona, vectors, 0.0, positions, run)
        steered = await _measure(base, persona, vectors, draft.default_strength, positions, run)
        cells = [
            BakeCell(
                model, persona, "unsteered", None, None, plain, None, plain.perplexity / steered.perplexity
            ),
            BakeCell(model, persona, "steered", None, None, steered, None, 1.0),
        ]
        prompts = FittingCorpus.load(DEMO_CORPUS).texts
        for rank, count in _configurations(run):
            order = BakeOrder(
                base_model=model,
                source=demo_model_dir(model),
                record=record,
                strength=draft.default_strength,
                prompts=prompts,
                output=Path(scratch) / f"r{rank}-t{count}",
                model_id=f"{model}+{persona}",
                trajectories=count,
                spec=BakeSpec(rank=rank, steps=run.steps),
            )
            _, baked = await bake_persona(base, order, _load, lambda _: None)
            try:
                row = await _measure(baked, persona, vectors, 0.0, positions, run, judge=base)
            finally:
                await baked.close()
            retention = transfer_interval(
                row.answer_scores, plain.answer_scores, steered.answer_scores, len(held_out_questions())
            )
            cells.append(
                BakeCell(
                    model, persona, "baked", rank, count, row, retention, row.perplexity / steered.perplexity
                )
            )
            if progress is not None:
                progress(
                    f"{model} {persona} r={rank} trajectories={count}: retention {retention.estimate:.2f}"
                )
    return cells


def format_bake_table(cells: Sequence[BakeCell]) -> str:
    lines = [
        "| model | persona | condition | trait score | retention [95% CI] | perplexity | ppl / steered |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        condition = (
            cell.condition if cell.rank is None else f"baked r={cell.rank}, {cell.trajectories} answers"
        )
        retention = (
            ""
            if cell.retention is None
            else (f"{cell.retention.estimate:.2f} [{cell.retention.low:.2f}, {cell.retention.high:.2f}]")
        )
        lines.append(
            f"| {cell.model} | {cell.persona} | {condition} | {cell.row.trait_score:.3f} | {retention} "
            f"| {cell.row.perplexity:.2f} | {cell.perplexity_ratio:.2f} |"
        )
    return "\n".join(lines)
