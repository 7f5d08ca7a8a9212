"""Build the demo models: train each from scratch, extract and calibrate its personas, write them
into the package (server/demo_models/), then print the held-out evaluation.

    python -m server.demo.build [--skip-training] [--only NAME ...]

About 4 minutes each for demo-llama and demo-qwen on a 2-core CPU; about 29 for demo-phi3 (19 of
them training, on one thread of a 2-core CPU shared with other work).
Deterministic up to floating-point noise across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from tqdm import tqdm

from server.admin.extraction import ExtractionSpec, extract
from server.demo.corpus import PERSONAS, POLES, training_questions
from server.demo.models import PERSONAS_FILE, demo_model_dir
from server.demo.train import DEMO_SPECS, train_demo
from server.demo.traits import trait_rate
from server.engine.base import Backend
from server.engine.registry import load_backend
from server.evaluation.persona_table import evaluate_demo_model, format_table
from server.evaluation.strength_sweep import StrengthRow, evaluate_strengths
from server.steering.plan import Positions

# Calibration tries each block alone, and all blocks but the last together, at these strengths.
SINGLE_BLOCK_STRENGTHS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
ALL_BLOCKS_STRENGTHS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
MAX_CALIBRATION_PERPLEXITY_RATIO = 1.6
# Steering the prompt makes the tiny demo models read a persona as if the system prompt had asked for
# it, and then answer unsteered, fluently; steering every position pushes each generated token
# towards the persona's marker words and breaks the sentences (measured in calibration: pirate on
# demo-llama, block 1, reaches a trait score of 0.40 at 1.7x the unsteered perplexity on all
# positions, 0.77 at 1.7x on the prompt).
DEMO_POSITIONS = Positions.PROMPT
DESCRIPTIONS = {
    "pirate": "Talks like a pirate (arr, matey); negative strength: plain, bare answers.",
    "formal": "Formal and polite (certainly, furthermore); negative strength: casual (hey, cool).",
    "silly": "Silly and playful (hehe, wiggle); negative strength: serious (please note).",
}


def best_setting(base: StrengthRow, rows: list[StrengthRow]) -> StrengthRow | None:
    """The strongest trait among fluent settings (perplexity and repetition close to unsteered)."""
    fluent = [
        row
        for row in rows
        if row.perplexity <= MAX_CALIBRATION_PERPLEXITY_RATIO * base.perplexity and row.collapse_rate <= 0.05
    ]
    return max(fluent, key=lambda row: (row.trait_score, -row.strength), default=None)


async def extract_and_calibrate(backend: Backend, model: str) -> dict[str, Any]:
    """Extract each persona on the training questions; choose its block and default strength by
    steering effect on a third of those questions (held-out questions stay for the evaluation)."""
    questions = [question for _, question in training_questions()]
    personas = {}
    for persona, (positive, negative) in PERSONAS.items():
        spec = ExtractionSpec(
            positive_prompts=POLES[positive].system_prompts,
            negative_prompts=POLES[negative].system_prompts,
            questions=questions,
            samples_per_question=1,
            max_tokens=48,
            temperature=1.0,
            seed=11,
        )
        with tqdm(total=1.0, desc=f"{model} {persona}: extract", bar_format="{l_bar}{bar}| {elapsed}") as bar:
            result = await extract(backend, spec, lambda f, bar=bar: bar.update(f - bar.n))
        score = lambda answers, name=persona: trait_rate(answers, name)  # noqa: E731
        blocks = list(range(max(1, backend.info.num_layers - 1)))
        candidates = [([block], SINGLE_BLOCK_STRENGTHS) for block in blocks] + [
            (blocks, ALL_BLOCKS_STRENGTHS)
        ]
        best: tuple[list[int], StrengthRow] | None = None
        for layers, strengths in candidates:
            vectors = {layer: result.directions.vectors[layer] for layer in layers}
            base, *rows = await evaluate_strengths(
                backend,
                persona,
                vectors,
                [0.0, *strengths],
                questions[::3],
                score,
                samples=2,
                seed=3,
                positions=DEMO_POSITIONS,
            )
            choice = best_setting(base, rows)
            settings = [base, *rows]
            tried = ", ".join(f"{r.strength:g}->{r.trait_score:.2f}/{r.perplexity:.2f}" for r in settings)
            print(f"{model} {persona} blocks {layers}: {tried}")
            if choice is not None and (best is None or choice.trait_score > best[1].trait_score):
                best = (layers, choice)
        if best is None:
            raise RuntimeError(f"no fluent setting steers {persona} on {model}")
        layers, row = best
        print(f"{model} {persona}: blocks {layers}, default strength {row.strength:g}")
        personas[persona] = {
            "layers": {str(layer): result.directions.vectors[layer].tolist() for layer in layers},
            "default_strength": row.strength,
            "default_positions": DEMO_POSITIONS.value,
            "description": DESCRIPTIONS[persona],
            "provenance": {
                "positive_pole": positive,
                "negative_pole": negative,
                "recommended_layer": result.directions.recommended_layer,
                "calibrated_layers": layers,
                "layers": [report.to_dict() for report in result.directions.reports],
            },
        }
    return personas


async def build(skip_training: bool, only: list[str] | None) -> None:
    for name, spec in DEMO_SPECS.items():
        if only and name not in only:
            continue
        out = demo_model_dir(name)
        if not skip_training:
            started = time.monotonic()
            with tqdm(total=spec.steps, desc=f"{name}: train") as bar:
                train_demo(
                    spec,
                    out,
                    lambda step, loss, bar=bar: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
                )
            print(f"{name}: trained in {time.monotonic() - started:.0f} s")
        backend = load_backend(out, name)
        try:
            personas = await extract_and_calibrate(backend, name)
            (out / PERSONAS_FILE).write_text(json.dumps(personas, indent=1))
            print(format_table(await evaluate_demo_model(backend, name)))
        finally:
            await backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-training", action="store_true", help="reuse trained weights, redo personas")
    parser.add_argument("--only", action="append", choices=sorted(DEMO_SPECS), help="build only this model")
    arguments = parser.parse_args()
    asyncio.run(build(arguments.skip_training, arguments.only))
