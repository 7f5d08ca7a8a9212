"""Build the demo models: train both from scratch, extract and calibrate their personas, write them
into the package (server/demo_models/), then print the held-out evaluation.

    python -m server.demo.build [--skip-training]

About 8 minutes on a 2-core CPU. Deterministic up to floating-point noise across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from tqdm import tqdm

from server.demo.corpus import PERSONAS, POLES, training_questions
from server.demo.evaluate import evaluate_demo_model, format_table
from server.demo.models import PERSONAS_FILE, demo_model_dir
from server.demo.train import DEMO_SPECS, train_demo
from server.demo.traits import trait_rate
from server.engine.hf.backend import HFBackend
from server.serving.extraction import ExtractionSpec, extract
from server.serving.steering_eval import StrengthRow, evaluate_strengths

CALIBRATION_STRENGTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
MAX_CALIBRATION_PERPLEXITY_RATIO = 1.6
DESCRIPTIONS = {
    "pirate": "Talks like a pirate (arr, matey); negative strength: plain, bare answers.",
    "formal": "Formal and polite (certainly, furthermore); negative strength: casual (hey, cool).",
    "silly": "Silly and playful (hehe, wiggle); negative strength: serious (please note).",
}


def best_setting(base: StrengthRow, rows: list[StrengthRow]) -> StrengthRow | None:
    """The strongest trait among fluent settings (perplexity and repetition close to unsteered)."""
    fluent = [
        row for row in rows
        if row.perplexity <= MAX_CALIBRATION_PERPLEXITY_RATIO * base.perplexity and row.collapse_rate <= 0.05
    ]  # fmt: skip
    return max(fluent, key=lambda row: (row.trait_score, -row.strength), default=None)


async def extract_and_calibrate(backend: HFBackend, model: str) -> dict[str, Any]:
    """Extract each persona on the training questions; choose its block and default strength by
    steering effect on a third of those questions (held-out questions stay for the evaluation)."""
    questions = [question for _, question in training_questions()]
    personas = {}
    for persona, (positive, negative) in PERSONAS.items():
        spec = ExtractionSpec(
            positive_prompts=POLES[positive].system_prompts, negative_prompts=POLES[negative].system_prompts,
            questions=questions, samples_per_question=1, max_tokens=48, temperature=1.0, seed=11,
        )  # fmt: skip
        with tqdm(total=1.0, desc=f"{model} {persona}: extract", bar_format="{l_bar}{bar}| {elapsed}") as bar:
            result = await extract(backend, spec, lambda f, bar=bar: bar.update(f - bar.n))
        score = lambda answers, name=persona: trait_rate(answers, name)  # noqa: E731
        best: tuple[int, StrengthRow] | None = None
        for layer in range(max(1, backend.info.num_layers - 1)):
            base, *rows = await evaluate_strengths(
                backend, persona, {layer: result.directions.vectors[layer]}, [0.0, *CALIBRATION_STRENGTHS],
                questions[::3], score, samples=2, seed=3,
            )  # fmt: skip
            choice = best_setting(base, rows)
            tried = ", ".join(f"{r.strength:g}->{r.trait_score:.2f}/{r.perplexity:.2f}" for r in [base, *rows])
            print(f"{model} {persona} block {layer}: {tried}")
            if choice is not None and (best is None or choice.trait_score > best[1].trait_score):
                best = (layer, choice)
        if best is None:
            raise RuntimeError(f"no fluent setting steers {persona} on {model}")
        layer, row = best
        print(f"{model} {persona}: block {layer}, default strength {row.strength:g}")
        personas[persona] = {
            "layers": {str(layer): result.directions.vectors[layer].tolist()},
            "default_strength": row.strength,
            "description": DESCRIPTIONS[persona],
            "provenance": {
                "positive_pole": positive,
                "negative_pole": negative,
                "recommended_layer": result.directions.recommended_layer,
                "calibrated_layer": layer,
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
        backend = HFBackend.load(out, model_id=name)
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
