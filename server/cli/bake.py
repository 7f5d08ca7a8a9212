"""`persona-server bake`: a persona baked into LoRA weights, in the terminal."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer


def bake(
    model: Annotated[str, typer.Option(help="A demo model's name, or a local HF model directory.")],
    persona: Annotated[str, typer.Option(help="The persona to bake (from --store, else the demo's).")],
    strength: Annotated[float | None, typer.Option(help="Default: the persona's default strength.")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 32,
    trajectories: Annotated[int, typer.Option(help="Answers of the steered model to learn from.")] = 200,
    steps: Annotated[int, typer.Option(help="Training steps (batches of 8 answers).")] = 300,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts, one per line (default: the bundled neutral corpus).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Folder for the outputs (default: baked/NAME).")] = None,
    name: Annotated[str | None, typer.Option(help="The baked model's name (default: MODEL+PERSONA).")] = None,
    store: Annotated[str | None, typer.Option(help="Persona store URL (default: the server's).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling and training seed.")] = 0,
) -> None:
    """Distil the model steered by a persona into a LoRA adapter (KL on the steered model's answers)."""
    from tqdm import tqdm

    from server.baking.bake import BakeOrder, bake_persona
    from server.baking.distill import BakeSpec
    from server.cli.bake_inputs import load_persona, model_source, prompts
    from server.engine.registry import load_backend

    source, model_id = model_source(model)
    baked_id = name or f"{model_id}+{persona}"

    async def load(folder: Path, served: str):
        return await asyncio.to_thread(load_backend, folder, served)

    async def run() -> dict:
        record = await load_persona(store, model_id, persona)
        base = await load(source, model_id)
        order = BakeOrder(
            base_model=model_id,
            source=source,
            record=record,
            strength=record.info.default_strength if strength is None else strength,
            prompts=prompts(prompts_file),
            output=output or Path("baked") / baked_id,
            model_id=baked_id,
            trajectories=trajectories,
            spec=BakeSpec(rank=rank, steps=steps, seed=seed),
        )
        try:
            with tqdm(
                total=1.0, desc=f"bake {persona}", bar_format="{l_bar}{bar}| {elapsed}<{remaining}"
            ) as bar:
                outcome, baked = await bake_persona(base, order, load, lambda done: bar.update(done - bar.n))
            await baked.close()
        finally:
            await base.close()
        return outcome.to_dict()

    _report(asyncio.run(run()))


def _report(outcome: dict) -> None:
    """The bake's outputs, and how much of the steered shift the baked model keeps."""
    retention = outcome["provenance"]["retention"]
    typer.echo(json.dumps({k: outcome[k] for k in ("model_id", "adapter", "merged", "loss_curve")}, indent=1))
    scores = ", ".join(f"{k} {retention[k + '_score']:.3f}" for k in ("unsteered", "steered", "baked"))
    typer.echo(
        f"persona score on {retention['prompts']} held-out prompts: {scores} "
        f"(the baked model keeps {retention['retained']:.2f} of the steered shift)"
    )
    served = f"--model {outcome['merged']} --served-model-name {outcome['model_id']}"
    typer.echo(f"serve it: persona-server serve {served}")
