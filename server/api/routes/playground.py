"""The playground page: static files shipped in the package, served at /playground (and / leads there).

The page is plain HTML, CSS and ES modules with no build step and nothing fetched from elsewhere; it
talks only to this server's public (/v1) and admin (/admin) APIs, with the keys the user types in.
It is not part of the API, so it stays out of the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
# The page names its assets with this prefix; the mount below serves them.
ASSETS_PATH = "/playground/assets"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/playground", status_code=307)


# The page runs only its own files and talks only to this server; images may be blobs it fetched
# with a key (the diagnostics and calibration plots). Keys sit in the tab's storage: no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@router.get("/playground")
async def playground() -> FileResponse:
    headers = {
        "Cache-Control": "no-cache",  # the page must match the server it comes from after an upgrade
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    }
    return FileResponse(PLAYGROUND_DIR / "index.html", headers=headers)


def install_playground(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=PLAYGROUND_DIR), name="playground-assets")
