"""ASGI middleware that refuses request bodies above a size cap with 413, before they are parsed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

from server.api.errors import error_response

# A body is parsed whole on the event loop, so its cap bounds how long one request can hold it.
# 32 bytes a token fits any real text of a full context (4-6 characters a token, a JSON escape of
# non-ASCII text 6 bytes a character) and a vector value written as JSON (about 22 bytes). The floor
# leaves room for the admin API's corpora and prompt lists on small models.
BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 8 * 1024 * 1024


def default_body_bytes(largest_payload: int) -> int:
    """The body cap for ``largest_payload`` tokens or vector values: the largest context served,
    or the largest vector upload (blocks x hidden size), whichever is larger."""
    return max(MIN_BODY_BYTES, largest_payload * BYTES_PER_TOKEN)


class BodySizeLimit:
    """``max_bytes`` is read per request: the default cap is known once the models are loaded.
    ``refused`` is called for every body refused (the metric of 413s)."""

    def __init__(self, app: Any, max_bytes: Callable[[], int], refused: Callable[[], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refused = refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.max_bytes()
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            self.refused()
            refusal = error_response(
                413, f"the request body exceeds {max_bytes} bytes", code="body_too_large"
            )
            await refusal(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Any:
            # A body sent without Content-Length (chunked) is counted as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    self.refused()
                    raise HTTPException(413, f"the request body exceeds {max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)
