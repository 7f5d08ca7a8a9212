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
from starlette.responses import Response
from starlette.types import Scope

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
# The page names its assets with this prefix; the mount below serves them.
ASSETS_PATH = "/playground/assets"

router = APIRouter(include_in_schema=False)

# The page runs only its own files and talks only to this server; images may be blobs it fetched
# with a key (the diagnostics and calibration plots). Keys sit in the tab's storage, and with no
# admin key a local browser is admin: no framing anywhere (X-Frame-Options for browsers that predate
# frame-ancestors), no guessing of content types, no address leaking to other sites.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Cache-Control": "no-cache",  # the page must match the server it comes from after an upgrade
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class PlaygroundFiles(StaticFiles):
    """The page's files with the page's headers: an asset path serves index.html too, and any file
    of the folder is as much the page as /playground is."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


@router.api_route("/", methods=["GET", "HEAD"])
async def root() -> RedirectResponse:
    return RedirectResponse("/playground", status_code=307)


@router.api_route("/playground", methods=["GET", "HEAD"])
async def playground() -> FileResponse:
    return FileResponse(PLAYGROUND_DIR / "index.html", headers=PAGE_HEADERS)


def install_playground(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSETS_PATH, PlaygroundFiles(directory=PLAYGROUND_DIR), name="playground-assets")
