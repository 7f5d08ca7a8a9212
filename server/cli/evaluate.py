"""`persona-server eval`: the demo personas' measured effect, or the cross-model transfer tables."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from server.evaluation.transfer_table import TransferRun


# The tables other than the default one, each a flag (their help is long).
TransferFlag = Annotated[
    bool,
    typer.Option(
        help="Instead: every demo persona carried between the demo models as the map request carries "
        "it, scored by three judges on both halves of the held-out questions."
    ),
]
RivalsFlag = Annotated[
    bool,
    typer.Option(
        help="Instead: the mapping methods side by side (learned maps, baselines, generated), with "
        "strength sweeps."
    ),
]
AblationFlag = Annotated[
    bool,
    typer.Option(
        help="Instead: the default mapping method's transfer against the number of prompts and against "
        "the target block."
    ),
]


def evaluate(
    samples: Annotated[int, typer.Option(help="Sampled answers per held-out question and strength.")] = 4,
    transfer: TransferFlag = False,
    rivals: RivalsFlag = False,
    ablation: AblationFlag = False,
    methods: Annotated[
        list[str] | None,
        typer.Option("--method", help="With --rivals: only these mapping methods (repeat; default all)."),
    ] = None,
    personas: Annotated[
        list[str] | None,
        typer.Option(
            "--persona",
            help="With --transfer, --rivals, --bake, --closed-loop or --operators: only these personas "
            "(repeat; default all).",
        ),
    ] = None,
    bake: Annotated[
        bool,
        typer.Option(
            help="Instead: how much of each demo persona a bake keeps (LoRA ranks, numbers of answers)."
        ),
    ] = False,
    steps: Annotated[int, typer.Option(help="With --bake: training steps of each bake.")] = 300,
    closed_loop: Annotated[
        bool, typer.Option(help="Instead: fixed strengths against persona_target, and persona_when rules.")
    ] = False,
    operators: Annotated[
        bool, typer.Option(help="Instead: a persona pushed to twice its strength, then capped or ablated.")
    ] = False,
    at_default_only: Annotated[
        bool, typer.Option(help="With --rivals: score the stored default strength only, no sweep.")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --rivals or --ablation: draw it (PNG).")] = None,
) -> None:
    """Print what the demo personas do at -s, 0, +s on held-out questions (trait score, perplexity)."""
    table_run = _transfer_run(samples, methods, personas, at_default_only)  # refused before loading

    async def table(backends: dict[str, Any]) -> None:
        if operators:
            await _operators(backends, samples, personas, json_out)
        elif closed_loop:
            await _closed_loop(backends, samples, personas, json_out)
        elif bake:
            await _bake(backends, samples, steps, personas, json_out)
        elif ablation:
            await _ablation(backends, samples, json_out, plot)
        elif rivals:
            await _rivals(backends, table_run, json_out, plot)
        elif transfer:
            await _transfer(backends, samples, personas, json_out)
        else:
            await _persona_table(backends, samples)

    asyncio.run(_on_demo_models(table))


async def _on_demo_models(work: Any) -> None:
    """``await work(backends)`` with the three demo models loaded, closed afterwards."""
    from server.demo.models import DEMO_MODEL_NAMES, demo_model_dir
    from server.engine.registry import load_backend

    backends = {name: load_backend(demo_model_dir(name), name) for name in DEMO_MODEL_NAMES}
    try:
        await work(backends)
    finally:
        for backend in backends.values():
            await backend.close()


async def _persona_table(backends: dict[str, Any], samples: int) -> None:
    from server.evaluation.persona_table import evaluate_demo_model, format_table

    verdicts = []
    for name, backend in backends.items():
        verdicts += await evaluate_demo_model(backend, name, samples=samples)
    typer.echo(format_table(verdicts))


def _progress(line: str) -> None:
    typer.echo(line, err=True)


def _transfer_run(
    samples: int, methods: list[str] | None, personas: list[str] | None, at_default_only: bool
) -> TransferRun:
    from server.evaluation.transfer_table import SWEEP, TransferRun
    from server.steering.mapping import MappingMethod

    known = {method.value for method in MappingMethod}
    unknown = sorted(set(methods or ()) - known)
    if unknown:
        raise typer.BadParameter(f"unknown method {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    return TransferRun(
        samples=samples,
        methods=tuple(MappingMethod(m) for m in methods) if methods else tuple(MappingMethod),
        multiples=(1.0,) if at_default_only else SWEEP,
        personas=tuple(personas) if personas else None,
    )


def _write(records: list[dict[str, Any]], json_out: Path | None, plot: Path | None, draw: Any) -> None:
    if json_out is not None:
        json_out.write_text(json.dumps(records, indent=2))
    if plot is not None:
        plot.write_bytes(draw(records))


async def _transfer(
    backends: dict[str, Any], samples: int, personas: list[str] | None, json_out: Path | None
) -> None:
    from server.evaluation.served_transfer import ServedRun, format_served_table, served_transfer_table

    run = ServedRun(samples=samples, personas=tuple(personas) if personas else None)
    cells = await served_transfer_table(backends, run, progress=_progress)
    typer.echo(format_served_table(cells))
    _write([cell.to_dict() for cell in cells], json_out, None, None)


async def _rivals(
    backends: dict[str, Any], run: TransferRun, json_out: Path | None, plot: Path | None
) -> None:
    from server.evaluation.plots import transfer_png
    from server.evaluation.transfer_table import format_transfer_table, transfer_record, transfer_table

    rows = await transfer_table(backends, run, progress=_progress)
    typer.echo(format_transfer_table(rows))
    title = "demo personas mapped between the demo models"
    _write([transfer_record(r) for r in rows], json_out, plot, lambda records: transfer_png(records, title))


async def _ablation(backends: dict[str, Any], samples: int, json_out: Path | None, plot: Path | None) -> None:
    from server.evaluation.plots import ablation_png
    from server.evaluation.transfer_ablation import format_ablation_table, transfer_ablations

    points = await transfer_ablations(backends, samples=samples, progress=_progress)
    typer.echo(format_ablation_table(points))
    _write([point.to_dict() for point in points], json_out, plot, ablation_png)


async def _bake(
    backends: dict[str, Any], samples: int, steps: int, personas: list[str] | None, json_out: Path | None
) -> None:
    from server.demo.models import load_demo_personas
    from server.evaluation.bake_table import BakeRun, format_bake_table, persona_bake_cells

    run, cells = BakeRun(samples=samples, steps=steps), []
    for model, backend in backends.items():
        for draft in load_demo_personas(model):
            if personas is None or draft.name in personas:
                cells += await persona_bake_cells(backend, model, draft.name, run, progress=_progress)
    typer.echo(format_bake_table(cells))
    _write([cell.to_dict() for cell in cells], json_out, None, None)


async def _closed_loop(
    backends: dict[str, Any], samples: int, personas: list[str] | None, json_out: Path | None
) -> None:
    from server.evaluation.closed_loop_table import LoopRun, closed_loop_rows, format_loop_table

    rows = []
    for model, backend in backends.items():
        rows += await closed_loop_rows(backend, model, LoopRun(samples=samples), personas, _progress)
    typer.echo(format_loop_table(rows))
    _write([row.to_dict() for row in rows], json_out, None, None)


async def _operators(
    backends: dict[str, Any], samples: int, personas: list[str] | None, json_out: Path | None
) -> None:
    from server.demo.models import load_demo_personas
    from server.evaluation.operator_table import format_operator_table, operator_rows

    rows = []
    for model, backend in backends.items():
        for draft in load_demo_personas(model):
            if personas is None or draft.name in personas:
                rows += await operator_rows(backend, model, draft, samples, progress=_progress)
    typer.echo(format_operator_table(rows))
    _write([row.to_dict() for row in rows], json_out, None, None)
