"""`persona-server map ...`: fit maps between served models and carry personas across, over the admin API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from server.cli.personas import DEFAULT_URL, AdminKey, ServerUrl, _fail, _send

app = typer.Typer(help="Fit linear maps between served models and map personas with them.")


def _follow(url: str, admin_key: str | None, status_url: str, what: str) -> dict[str, Any]:
    """Wait for a job, with a progress bar on a terminal; its result. Ctrl-C cancels the job."""
    from tqdm import tqdm

    bar_format = "{l_bar}{bar}| {elapsed}<{remaining}"
    with tqdm(total=1.0, desc=what, bar_format=bar_format, disable=None) as bar:  # None: only on a tty
        try:
            while True:
                state = _send(url, admin_key, "GET", status_url).json()
                bar.update(state["progress"] - bar.n)
                if state["status"] == "succeeded":
                    return state["result"]
                if state["status"] in ("failed", "cancelled"):
                    _fail(f"the {what} {state['status']}: {state['error'] or 'cancelled on the server'}")
                time.sleep(0.5)
        except KeyboardInterrupt:
            _send(url, admin_key, "DELETE", status_url)
            _fail(f"the {what} was cancelled")


def _layer_map(text: str) -> dict[str, int]:
    try:
        pairs = [part.split(":") for part in text.split(",")]
        return {str(int(source)): int(target) for source, target in pairs}
    except ValueError:
        raise typer.BadParameter("give source:target block pairs, e.g. 12:14,16:19") from None


@app.command("fit")
def fit(
    source: Annotated[str, typer.Option(help="Served model the personas come from.")],
    target: Annotated[str, typer.Option(help="Served model they go to.")],
    layers: Annotated[str | None, typer.Option(help="source:target block pairs (default: by depth).")] = None,
    texts_file: Annotated[Path | None, typer.Option(help="Texts, one per line (default: bundled).")] = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation folds (default 5).")] = None,
    reduce: Annotated[str, typer.Option(help="mean | last: each text's block output.")] = "mean",
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Fit ridge and Procrustes maps from SOURCE to TARGET, wait for the job, print the diagnostics."""
    body: dict[str, Any] = {"source_model": source, "target_model": target, "reduce": reduce}
    if layers is not None:
        body["layers"] = _layer_map(layers)
    if texts_file is not None:
        body["texts"] = [line.strip() for line in texts_file.read_text().splitlines() if line.strip()]
    if folds is not None:
        body["folds"] = folds
    job = _send(url, admin_key, "POST", "/admin/mappings", json=body).json()
    result = _follow(url, admin_key, job["status_url"], "fit")
    typer.echo(f"ridge mapping {result['mapping_id']}, procrustes mapping {result['procrustes_mapping_id']}")
    for block, diagnostics in result["diagnostics"].items():
        typer.echo(
            f"block {block} -> {result['layers'][block]}: lambda {diagnostics['lambda']:.4g}, "
            f"held-out R^2 {diagnostics['r2']:.3f}, effective rank {diagnostics['effective_rank']:.1f}"
        )


@app.command("list")
def list_mappings(url: ServerUrl = DEFAULT_URL, admin_key: AdminKey = None) -> None:
    """List stored mappings."""
    for info in _send(url, admin_key, "GET", "/admin/mappings").json()["data"]:
        typer.echo(f"{info['id']}\t{info['method']}\t{info['source_model']} -> {info['target_model']}")


@app.command("persona")
def map_persona(
    name: Annotated[str, typer.Argument(help="Persona to carry across.")],
    source: Annotated[str, typer.Option(help="Served model it exists on.")],
    target: Annotated[str, typer.Option(help="Served model to store it for.")],
    method: Annotated[
        str,
        typer.Option(
            help="generated (no fit needed) | ridge | procrustes | concept | zero_pad | interpolate | random"
        ),
    ] = "generated",
    mapping_id: Annotated[str | None, typer.Option(help="Default: the newest fitting mapping.")] = None,
    target_name: Annotated[
        str | None, typer.Option(help="Store it under this name on TARGET (default: NAME).")
    ] = None,
    replace: Annotated[
        bool, typer.Option(help="Replace a persona of that name on TARGET not mapped from NAME on SOURCE.")
    ] = False,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Map NAME from SOURCE to TARGET and store it there (an unrelated persona there is kept: error 409)."""
    body = {
        "source_model": source,
        "target_model": target,
        "method": method,
        "mapping_id": mapping_id,
        "target_name": target_name,
        "replace": replace,
    }
    job = _send(url, admin_key, "POST", f"/admin/personas/{name}/map", json=body).json()
    result = _follow(url, admin_key, job["status_url"], "map")
    info = result["persona"]
    typer.echo(
        f"stored {info['name']} for {info['model']}: version {info['version']}, blocks {info['layers']}"
    )
    calibration = info.get("provenance", {}).get("strength_calibration")
    if calibration is not None:  # the generated method: how the vectors' scale was chosen
        typer.echo(
            f"scale {calibration['scale']:g} at strength {calibration['strength']:g}, predicted transfer "
            f"{calibration['predicted_transfer']:.2f}; the ladder: GET /admin/personas/{info['name']}"
            f"/calibration.png?model={info['model']}"
        )
    if result["warning"] is not None:  # the source persona changed while it was carried
        typer.echo(f"warning: {result['warning']}", err=True)
