"""Ablations of the default mapping method (generated): transfer against the number of prompts the
source answers, and against the target block the persona is carried to.

Each point is the generated method end to end (carry, calibrate the default strength, score at that
default on the target's held-out questions against the native persona), as in the transfer table
(``transfer_table.py``), on a cycle of directions that has each demo model once as source and once as
target. The block ablation takes the personas that live on one source block and moves their target
block over every steerable block of the target; offset 0 is the block of the same relative depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from persona_store.records import PersonaDraft
from server.demo.corpus import held_out_questions
from server.demo.models import load_demo_personas
from server.demo.traits import trait_rate
from server.engine.base import Backend
from server.evaluation.intervals import Interval, transfer_interval
from server.evaluation.strength_sweep import StrengthRow, evaluate_strengths
from server.evaluation.transfer_table import GENERATION, OVERSHOOT_CAP
from server.steering.mapping import corresponding_layer
from server.steering.plan import Positions
from server.transfer.carry import GenerationSpec, carry_by_generation

DIRECTIONS = (("demo-llama", "demo-qwen"), ("demo-qwen", "demo-phi3"), ("demo-phi3", "demo-llama"))
PROMPT_COUNTS = (18, 35, 70, 140)


@dataclass(frozen=True)
class AblationPoint:
    ablation: str  # "prompts" or "block"
    source: str
    target: str
    persona: str
    setting: int  # the number of prompts, or the target block's offset from the same relative depth
    transfer: Interval

    def to_dict(self) -> dict[str, object]:
        fields = {key: value for key, value in self.__dict__.items() if key != "transfer"}
        interval = self.transfer
        return {
            **fields,
            "transfer": interval.estimate,
            "transfer_low": interval.low,
            "transfer_high": interval.high,
        }


class _Cell:
    """One persona carried from ``source`` to ``target``: transfer at the carried persona's
    calibrated default against the target's native persona (whose rows are measured once)."""

    def __init__(
        self,
        backends: dict[str, Backend],
        source: str,
        target: str,
        persona: PersonaDraft,
        native: PersonaDraft,
        samples: int,
    ) -> None:
        self.source, self.target, self.persona = source, target, persona
        self._engines = backends[source], backends[target]
        self._native, self._samples = native, samples
        self._questions = held_out_questions()
        self._reference: tuple[StrengthRow, StrengthRow] | None = None

    async def _row(self, vectors: Mapping[int, np.ndarray], strength: float, positions: str) -> StrengthRow:
        name = self._native.name
        rows = await evaluate_strengths(
            self._engines[1],
            name,
            vectors,
            [strength],
            self._questions,
            lambda answers: trait_rate(answers, name),
            samples=self._samples,
            seed=11,
            positions=Positions(positions),
        )
        return rows[0]

    async def point(
        self, ablation: str, setting: int, spec: GenerationSpec, pairs: dict[int, int] | None = None
    ) -> AblationPoint:
        native, persona = self._native, self.persona
        if self._reference is None:
            unsteered = await self._row(native.vectors, 0.0, "all")
            steered = await self._row(native.vectors, native.default_strength, native.default_positions)
            self._reference = unsteered, steered
        carried = await carry_by_generation(
            *self._engines,
            persona.vectors,
            persona.default_strength,
            persona.default_positions,
            spec,
            block_pairs=pairs,
        )
        row = await self._row(carried.vectors, persona.default_strength, persona.default_positions)
        baseline, native_row = self._reference
        transfer = transfer_interval(
            row.answer_scores,
            baseline.answer_scores,
            native_row.answer_scores,
            len(self._questions),
            overshoot_cap=OVERSHOOT_CAP,
        )
        return AblationPoint(ablation, self.source, self.target, persona.name, setting, transfer)


async def transfer_ablations(
    backends: dict[str, Backend], samples: int = 1, progress: Callable[[str], None] | None = None
) -> list[AblationPoint]:
    points: list[AblationPoint] = []
    for source, target in DIRECTIONS:
        natives = {p.name: p for p in load_demo_personas(target)}
        for persona in load_demo_personas(source):
            cell = _Cell(backends, source, target, persona, natives[persona.name], samples)
            if progress is not None:
                progress(f"{persona.name}: {source} -> {target}")
            for count in PROMPT_COUNTS:
                stride = max(1, len(GENERATION.prompts) // count)
                spec = dataclasses.replace(GENERATION, prompts=GENERATION.prompts[::stride][:count])
                points.append(await cell.point("prompts", count, spec))
            if len(persona.vectors) != 1:
                continue
            (block,) = persona.vectors
            source_blocks, target_info = backends[source].info.num_layers, backends[target].info
            same_depth = corresponding_layer(block, source_blocks, target_info.num_layers)
            for target_block in target_info.steerable_layers:
                pairs = {block: target_block}
                points.append(await cell.point("block", target_block - same_depth, GENERATION, pairs))
    return points


def format_ablation_table(points: list[AblationPoint]) -> str:
    """Per ablation and setting: the mean transfer over the personas and directions tried."""
    lines = ["| ablation | setting | mean transfer at the calibrated default | cells |", "|---|---|---|---|"]
    for ablation in ("prompts", "block"):
        for setting in sorted({p.setting for p in points if p.ablation == ablation}):
            chosen = [p.transfer.estimate for p in points if (p.ablation, p.setting) == (ablation, setting)]
            shown = f"{setting:+d}" if ablation == "block" else str(setting)  # block: an offset
            lines.append(f"| {ablation} | {shown} | {np.mean(chosen):.2f} | {len(chosen)} |")
    return "\n".join(lines)
