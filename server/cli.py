"""The `persona-server` command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="persona-server: an OpenAI-compatible server that steers models with persona vectors.")


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
    if not settings.model:
        raise typer.BadParameter("give at least one --model (or PERSONA_SERVER_MODEL)")
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
