"""`persona-server eval`: the demo personas' measured effect, or the cross-model transfer table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer


def evaluate(
    samples: Annotated[int, typer.Option(help="Sampled answers per held-out question and strength.")] = 4,
    transfer: Annotated[
        bool,
        typer.Option(
            help="Instead: the transfer table of every demo persona mapped between the demo models."
        ),
    ] = False,
    ablation: Annotated[
        bool,
        typer.Option(
            help="Instead: the default mapping method's transfer against the number of prompts and "
            "against the target block."
        ),
    ] = False,
    methods: Annotated[
        list[str] | None,
        typer.Option("--method", help="With --transfer: only these mapping methods (repeat; default all)."),
    ] = None,
    personas: Annotated[
        list[str] | None,
        typer.Option("--persona", help="With --transfer: only these personas (repeat; default all)."),
    ] = None,
    at_default_only: Annotated[
        bool, typer.Option(help="With --transfer: score the stored default strength only, no sweep.")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --transfer or --ablation: draw it (PNG).")] = None,
) -> None:
    """Print what the demo personas do at -s, 0, +s on held-out questions (trait score, perplexity)."""
    from server.demo.models import DEMO_MODEL_NAMES, demo_model_dir
    from server.demo.persona_table import evaluate_demo_model, format_table
    from server.demo.transfer import (
        SWEEP,
        TransferRun,
        format_transfer_table,
        transfer_record,
        transfer_table,
    )
    from server.demo.transfer_ablation import format_ablation_table, transfer_ablations
    from server.engine.registry import load_backend
    from server.steering.mapping import MappingMethod

    known = {method.value for method in MappingMethod}
    unknown = sorted(set(methods or ()) - known)
    if unknown:
        raise typer.BadParameter(f"unknown method {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    table_run = TransferRun(
        samples=samples,
        methods=tuple(MappingMethod(m) for m in methods) if methods else tuple(MappingMethod),
        multiples=(1.0,) if at_default_only else SWEEP,
        personas=tuple(personas) if personas else None,
    )

    async def run() -> None:
        backends = {name: load_backend(demo_model_dir(name), name) for name in DEMO_MODEL_NAMES}
        try:
            if ablation:
                points = await transfer_ablations(
                    backends, samples=samples, progress=lambda s: typer.echo(s, err=True)
                )
                typer.echo(format_ablation_table(points))
                records = [point.to_dict() for point in points]
                if json_out is not None:
                    json_out.write_text(json.dumps(records, indent=2))
                if plot is not None:
                    from server.serving.mapping_plots import ablation_png

                    plot.write_bytes(ablation_png(records))
                return
            if transfer:
                rows = await transfer_table(backends, table_run, progress=lambda s: typer.echo(s, err=True))
                typer.echo(format_transfer_table(rows))
                records = [transfer_record(r) for r in rows]
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
