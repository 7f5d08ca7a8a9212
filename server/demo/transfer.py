"""The transfer table: how much of a persona's trait shift survives being mapped to the other demo model.

For each direction (demo-llama -> demo-qwen and back) a ridge and a Procrustes map are fitted per
block on the server's default fitting corpus (mean block outputs over each text), and every demo
persona of the source is carried to the target by each method through the very function the
server's map endpoint calls (``steering.persona_transfer``); the concept adapter learns from the
two OTHER personas, which exist natively on both models. On the target's held-out questions, each
condition is scored with the source persona's positions at 1, 2 and 4 times its default strength
(the mapped vectors are calibrated, so the strength keeps about its meaning), and the strongest
trait score among the coherent settings (perplexity under the unsteered target within 2x, no more
collapse) is kept; the native persona runs at its own default strength. "Transfer" is the
condition's trait shift over the native persona's shift on the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from persona_store.records import PersonaDraft
from server.demo.corpus import held_out_questions
from server.demo.models import DEMO_MODEL_NAMES, load_demo_personas
from server.demo.traits import trait_rate
from server.engine.base import Backend
from server.serving.fitting_corpus import DEMO_CORPUS, FittingCorpus
from server.serving.persona_mapping import model_shape
from server.serving.strength_sweep import StrengthRow, evaluate_strengths
from server.steering.mapping import MappingMethod, corresponding_layer
from server.steering.persona_transfer import FittedMaps, ModelShape, fit_maps, map_persona_vectors
from server.steering.plan import Positions

CONDITIONS = ("none", "native", *(method.value for method in MappingMethod))
SWEEP = (1.0, 2.0, 4.0)  # multiples of the source persona's default strength tried for a mapped vector


def _fluent(row: StrengthRow, baseline: StrengthRow) -> bool:
    """The demo's coherence bar: perplexity under the unsteered model within 2x, no more collapse."""
    return row.perplexity <= 2 * baseline.perplexity and row.collapse_rate <= baseline.collapse_rate + 0.05


@dataclass(frozen=True)
class TransferRow:
    source: str
    target: str
    persona: str
    condition: str
    row: StrengthRow
    transfer: float  # trait shift over the native shift (1.0 for native, 0.0 for none)


def _mapped_vectors(
    method: MappingMethod,
    persona: PersonaDraft,
    others: list[tuple[PersonaDraft, PersonaDraft]],
    maps: FittedMaps,
    source: ModelShape,
    target: ModelShape,
) -> dict[int, np.ndarray]:
    """The persona on the target exactly as the server's map endpoint makes it: a learned method
    applies its own map, the others take target blocks and norm calibration from the ridge fit."""
    fitted = maps.procrustes if method is MappingMethod.PROCRUSTES else maps.ridge
    concepts = [(a.vectors, b.vectors) for a, b in others]
    return map_persona_vectors(method, persona.vectors, source, target, fitted=fitted, concepts=concepts)


async def transfer_table(
    backends: dict[str, Backend], samples: int = 2, progress: Callable[[str], None] | None = None
) -> list[TransferRow]:
    texts = list(FittingCorpus.load(DEMO_CORPUS).texts)  # the server's default fitting corpus
    activations = {name: await backends[name].text_activations(texts) for name in DEMO_MODEL_NAMES}
    shapes = {name: model_shape(backends[name].info) for name in DEMO_MODEL_NAMES}
    personas = {name: {p.name: p for p in load_demo_personas(name)} for name in DEMO_MODEL_NAMES}
    questions = held_out_questions()
    rows: list[TransferRow] = []
    for source, target in (DEMO_MODEL_NAMES, DEMO_MODEL_NAMES[::-1]):
        xs, ys = activations[source], activations[target]
        layer_map = {b: corresponding_layer(b, xs.shape[2], ys.shape[2]) for b in range(xs.shape[2])}
        maps = fit_maps(xs, ys, layer_map)  # as a fit with the server's defaults (mean over tokens)
        for name, persona in personas[source].items():
            native = personas[target][name]
            others = [(personas[source][o], personas[target][o]) for o in personas[source] if o != name]
            candidates: dict[str, tuple[dict[int, np.ndarray], float, Positions]] = {
                "native": (native.vectors, native.default_strength, Positions(native.default_positions)),
            }
            for method in MappingMethod:
                vectors = _mapped_vectors(method, persona, others, maps, shapes[source], shapes[target])
                candidates[method.value] = (
                    vectors,
                    persona.default_strength,
                    Positions(persona.default_positions),
                )
            score = lambda answers, trait=name: trait_rate(answers, trait)  # noqa: E731
            unsteered = await evaluate_strengths(
                backends[target], name, native.vectors, [0.0], questions, score, samples=samples, seed=11
            )
            baseline = unsteered[0]
            measured = {"none": baseline}
            for condition, (vectors, strength, positions) in candidates.items():
                if progress is not None:
                    progress(f"{source} -> {target}: {name}, {condition}")
                sweep = [strength] if condition == "native" else [f * strength for f in SWEEP]
                tried = await evaluate_strengths(
                    backends[target], name, vectors, sweep, questions, score, samples=samples, seed=11,
                    positions=positions,
                )  # fmt: skip
                fluent = [row for row in tried if _fluent(row, baseline)] or tried[:1]
                measured[condition] = max(fluent, key=lambda row: row.trait_score)
            native_shift = measured["native"].trait_score - baseline.trait_score
            for condition in CONDITIONS:
                shift = measured[condition].trait_score - baseline.trait_score
                ratio = shift / native_shift if native_shift > 0 else float("nan")
                rows.append(TransferRow(source, target, name, condition, measured[condition], ratio))
    return rows


def format_transfer_table(rows: list[TransferRow]) -> str:
    lines = [
        "| source -> target | persona | condition | strength | trait score | transfer | perplexity "
        "| collapse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.source} -> {r.target} | {r.persona} | {r.condition} | {r.row.strength:g} | "
            f"{r.row.trait_score:.3f} | {r.transfer:.2f} | {r.row.perplexity:.2f} | "
            f"{r.row.collapse_rate:.3f} |"
        )
    return "\n".join(lines)
