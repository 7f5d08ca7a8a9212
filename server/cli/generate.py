"""`persona-server generate`: one chat answer in the terminal, optionally steered by a vector file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer


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
    """Generate one chat answer with the engine the model calls for, optionally steered, as it streams."""
    from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
    from server.engine.registry import load_backend
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
        backend = load_backend(model)
        try:
            async for chunk in backend.generate(request):
                typer.echo(chunk.text, nl=False)
            typer.echo()
        finally:
            await backend.close()

    asyncio.run(run())
