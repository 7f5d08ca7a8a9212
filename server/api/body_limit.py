"""ASGI middleware that refuses request bodies above a size cap with 413, before they are parsed."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from server.api.errors import error_response


class BodySizeLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            refusal = error_response(
                413, f"the request body exceeds {self.max_bytes} bytes", code="body_too_large"
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
                if received > self.max_bytes:
                    raise HTTPException(413, f"the request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)
