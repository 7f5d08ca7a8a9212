"""`persona-server serve`: the HTTP server, its flags derived from ``Settings``."""

from __future__ import annotations

import typer


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
