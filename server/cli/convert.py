"""`persona-server convert`: an HF checkpoint written as a GGUF file of the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def convert(
    model_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Local HF checkpoint.")],
    output: Annotated[Path, typer.Argument(dir_okay=False, help="The GGUF file to write.")],
) -> None:
    """Write a local HF checkpoint as an F32 GGUF file of the same weights (the model types of
    docs/architectures.md whose llama.cpp column is tested)."""
    from server.gguf.model import ConversionError, convert_hf_to_gguf

    try:
        written = convert_hf_to_gguf(model_dir, output)
    except ConversionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {written} ({written.stat().st_size} bytes)")
