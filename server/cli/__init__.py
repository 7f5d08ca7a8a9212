"""The `persona-server` command line: one module a command group, gathered here."""

from __future__ import annotations

import typer

from server.cli import bake, convert, evaluate, extract, generate, serve
from server.cli.mappings import app as mappings_app
from server.cli.personas import app as personas_app

app = typer.Typer(help="persona-server: an OpenAI-compatible server that steers models with persona vectors.")
app.add_typer(personas_app, name="personas")
app.add_typer(mappings_app, name="map")


@app.callback()
def main() -> None:
    """persona-server command line."""


app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)(serve.serve)
app.command()(generate.generate)
app.command()(extract.extract)
app.command()(bake.bake)
app.command()(convert.convert)
app.command("eval")(evaluate.evaluate)
