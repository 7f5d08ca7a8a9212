"""`persona-server extract`: a persona vector from contrastive system prompts, in the terminal."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer


def extract(
    model: Annotated[str, typer.Option(help="Local model directory or hub id.")],
    name: Annotated[str, typer.Option(help="Persona name.")],
    positive: Annotated[list[str], typer.Option(help="A system prompt that asks for the trait (repeat).")],
    negative: Annotated[list[str], typer.Option(help="A system prompt that asks for its opposite (repeat).")],
    question: Annotated[list[str] | None, typer.Option(help="A question to answer (repeat).")] = None,
    questions_file: Annotated[Path | None, typer.Option(help="Questions, one per line.")] = None,
    model_id: Annotated[
        str | None, typer.Option(help="Target model id of the record (default: dir name).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Answers per question and side.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Length of each answer.")] = 48,
    layer: Annotated[
        list[int] | None, typer.Option(help="Block to keep (repeat; default: recommended).")
    ] = None,
    default_strength: Annotated[float, typer.Option(help="Stored default strength.")] = 1.0,
    output: Annotated[Path | None, typer.Option(help="Write the persona as an upload body (JSON).")] = None,
    store: Annotated[str | None, typer.Option(help="Also store it: sqlite:///PATH.")] = None,
) -> None:
    """Extract a persona vector from contrastive system prompts (Chen et al. 2025) with a progress bar."""
    from tqdm import tqdm

    from server.admin.extraction import ExtractionSpec
    from server.admin.extraction import extract as run_extraction
    from server.engine.registry import load_backend

    questions = list(question or [])
    if questions_file is not None:
        questions += [line.strip() for line in questions_file.read_text().splitlines() if line.strip()]
    if not questions:
        raise typer.BadParameter("give --question or --questions-file")
    spec = ExtractionSpec(positive, negative, questions, samples_per_question=samples, max_tokens=max_tokens)

    async def run() -> dict:
        backend = load_backend(model, model_id)
        try:
            with tqdm(
                total=1.0, desc=f"extract {name}", bar_format="{l_bar}{bar}| {elapsed}<{remaining}"
            ) as bar:
                result = await run_extraction(backend, spec, lambda done: bar.update(done - bar.n))
        finally:
            await backend.close()
        chosen = layer or [result.directions.recommended_layer]
        body = {
            "model": backend.info.id,
            "layers": {str(block): result.directions.vectors[block].tolist() for block in chosen},
            "default_strength": default_strength,
            "description": f"extracted from {len(positive)} positive and {len(negative)} negative prompts",
        }
        if store is not None:
            await _store_extracted(store, name, body, result.summary())
        return {**body, "report": result.summary()}

    body = asyncio.run(run())
    _print_report(body["report"])
    if output is not None:
        output.write_text(json.dumps(body))
        typer.echo(f"wrote {output}")


def _print_report(report: dict) -> None:
    for entry in report["layers"]:
        layer_line = f"block {entry['layer']:>3}: norm {entry['norm']:.3f}"
        typer.echo(f"{layer_line}  separation {entry['separation']:.2f}  accuracy {entry['accuracy']:.2f}")
    typer.echo(f"recommended block: {report['recommended_layer']}")


async def _store_extracted(store_url: str, name: str, body: dict, report: dict) -> None:
    import numpy as np

    from persona_store.records import PersonaDraft
    from server.app import open_store

    persona_store = open_store(store_url)
    try:
        draft = PersonaDraft(
            model=body["model"],
            name=name,
            vectors={int(k): np.asarray(v, dtype=np.float32) for k, v in body["layers"].items()},
            default_strength=body["default_strength"],
            description=body["description"],
            provenance={"kind": "extracted", "recommended_layer": report["recommended_layer"]},
        )
        info = await persona_store.put(draft)
        typer.echo(f"stored {name} for {info.model}, version {info.version}")
    finally:
        await persona_store.close()
