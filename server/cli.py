"""The `persona-server` command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from server.cli_mappings import app as mappings_app
from server.cli_personas import app as personas_app

app = typer.Typer(help="persona-server: an OpenAI-compatible server that steers models with persona vectors.")
app.add_typer(personas_app, name="personas")
app.add_typer(mappings_app, name="map")


@app.callback()
def main() -> None:
    """persona-server command line."""


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve models over the OpenAI API (flags: `persona-server serve --help`)."""
    import logging

    import uvicorn
    from pydantic_settings import CliApp

    from server.app import create_app
    from server.settings import Settings

    settings = CliApp.run(Settings, cli_args=ctx.args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Local model directory or hub id.")],
    prompt: Annotated[str, typer.Option(help="The user message, rendered with the model's chat template.")],
    vector: Annotated[
        Path | None, typer.Option(help='JSON file {"<block index>": [floats]} to steer with.')
    ] = None,
    strength: Annotated[float, typer.Option(help="Multiplies the vector.")] = 1.0,
    positions: Annotated[str, typer.Option(help="all | prompt | response")] = "all",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
) -> None:
    """Generate one chat answer with the HF engine, optionally steered, and print it as it streams."""
    from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
    from server.engine.hf.backend import HFBackend
    from server.steering.plan import SteeringPlan

    plan = None
    if vector is not None:
        layers = {int(layer): values for layer, values in json.loads(vector.read_text()).items()}
        plan = SteeringPlan(layers, strength=strength, positions=positions)
    request = GenerationRequest(
        messages=[ChatMessage("user", prompt)],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature),
        steering=plan,
    )

    async def run() -> None:
        backend = HFBackend.load(model)
        try:
            async for chunk in backend.generate(request):
                typer.echo(chunk.text, nl=False)
            typer.echo()
        finally:
            await backend.close()

    asyncio.run(run())


@app.command()
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

    from server.engine.hf.backend import HFBackend
    from server.serving.extraction import ExtractionSpec
    from server.serving.extraction import extract as run_extraction

    questions = list(question or [])
    if questions_file is not None:
        questions += [line.strip() for line in questions_file.read_text().splitlines() if line.strip()]
    if not questions:
        raise typer.BadParameter("give --question or --questions-file")
    spec = ExtractionSpec(positive, negative, questions, samples_per_question=samples, max_tokens=max_tokens)

    async def run() -> dict:
        backend = HFBackend.load(model, model_id=model_id)
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
    report = body["report"]
    for entry in report["layers"]:
        layer_line = f"block {entry['layer']:>3}: norm {entry['norm']:.3f}"
        typer.echo(f"{layer_line}  separation {entry['separation']:.2f}  accuracy {entry['accuracy']:.2f}")
    typer.echo(f"recommended block: {report['recommended_layer']}")
    if output is not None:
        output.write_text(json.dumps(body))
        typer.echo(f"wrote {output}")


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


@app.command()
def convert(
    model_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Local HF checkpoint.")],
    output: Annotated[Path, typer.Argument(dir_okay=False, help="The GGUF file to write.")],
) -> None:
    """Write a local HF Llama/Mistral/Qwen2 checkpoint as an F32 GGUF file of the same weights."""
    from server.engine.llamacpp.convert import ConversionError, convert_hf_to_gguf

    try:
        written = convert_hf_to_gguf(model_dir, output)
    except ConversionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {written} ({written.stat().st_size} bytes)")


@app.command("eval")
def evaluate(
    samples: Annotated[int, typer.Option(help="Sampled answers per held-out question and strength.")] = 4,
    transfer: Annotated[
        bool,
        typer.Option(
            help="Instead: the transfer table of every demo persona mapped between the demo models."
        ),
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --transfer: draw trait vs coherence (PNG).")] = None,
) -> None:
    """Print what the demo personas do at -s, 0, +s on held-out questions (trait score, perplexity)."""
    from server.demo.evaluate import evaluate_demo_model, format_table
    from server.demo.models import DEMO_MODEL_NAMES, demo_model_dir
    from server.demo.transfer import format_transfer_table, transfer_table
    from server.engine.hf.backend import HFBackend

    async def run() -> None:
        backends = {name: HFBackend.load(demo_model_dir(name), model_id=name) for name in DEMO_MODEL_NAMES}
        try:
            if transfer:
                rows = await transfer_table(
                    backends, samples=samples, progress=lambda s: typer.echo(s, err=True)
                )
                typer.echo(format_transfer_table(rows))
                records = [{"source": r.source, "target": r.target, "condition": r.condition,
                            "transfer": r.transfer, **r.row.to_dict()} for r in rows]  # fmt: skip
                if json_out is not None:
                    json_out.write_text(json.dumps(records, indent=2))
                if plot is not None:
                    from server.serving.mapping_plots import transfer_png

                    plot.write_bytes(transfer_png(records, "demo personas mapped between the demo models"))
                return
            verdicts = []
            for name in DEMO_MODEL_NAMES:
                verdicts += await evaluate_demo_model(backends[name], name, samples=samples)
            typer.echo(format_table(verdicts))
        finally:
            for backend in backends.values():
                await backend.close()

    asyncio.run(run())
