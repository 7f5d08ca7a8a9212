"""Domain exceptions -> HTTP status + OpenAI error object {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from persona_store.errors import MappingNotFound, PersonaNotFound, StoreUnavailable, VersionConflict
from persona_store.formats import FormatError
from server.admin.jobs import JobNotFound
from server.api.allow import allow_header
from server.api.params import field_path, telling_errors
from server.errors import EngineDied, EngineFault, InvalidRequest
from server.metrics import Metrics
from server.serving.errors import (
    EngineRestarting,
    ModelExists,
    ModelInUse,
    ModelNotFound,
    Overloaded,
    PersonaExists,
    RequestRejected,
)
from server.steering.errors import SteeringError
from server.steering.mapping import MappingError

logger = logging.getLogger(__name__)


def _ascii_json(content: Any) -> str:
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate echoed from bad input can never break encoding."""

    def render(self, content: Any) -> bytes:
        return _ascii_json(content).encode("ascii")


def ascii_json_by_choice(content: dict[str, Any]) -> bytes:
    """``AsciiJSONResponse``'s bytes of a response, its choices encoded one at a time.

    json's C encoder holds the GIL for the whole of one call: a 50 MB completion (n=128 with
    logprobs) encoded at once would stop the event loop for seconds even from another thread. Called
    from a worker thread, this lets the loop run between two choices."""
    parts = []
    for key, value in content.items():
        if key == "choices" and isinstance(value, list):
            encoded = "[" + ",".join(_ascii_json(choice) for choice in value) + "]"
        else:
            encoded = _ascii_json(value)
        parts.append(f"{_ascii_json(key)}:{encoded}")
    return ("{" + ",".join(parts) + "}").encode("ascii")


_ERROR_TYPES = "invalid_request_error, authentication_error, permission_error, rate_limit_error, server_error"


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description=f"One of: {_ERROR_TYPES}.")
    param: str | None = Field(description="The offending request field, when known.")
    code: str | None = Field(description="A machine-readable reason, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    """The OpenAI error object, the body of every error answer; routes declare it in /openapi.json."""

    error: ErrorDetail


class APIError(Exception):
    """An error raised directly by a route (authentication, malformed upload)."""

    def __init__(self, status: int, message: str, error_type: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.code = status, error_type, code


def error_response(
    status: int,
    message: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> AsciiJSONResponse:
    # A plain dict, not ErrorResponse: the message may echo a lone surrogate from bad input, which
    # only the ASCII renderer copes with. tests/test_openapi.py keeps the two shapes equal.
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return AsciiJSONResponse(body, status_code=status, headers=headers)


# exception class -> (status, OpenAI error type, code)
_MAPPING: list[tuple[type[Exception], int, str, str | None]] = [
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (PersonaNotFound, 404, "invalid_request_error", "persona_not_found"),
    (JobNotFound, 404, "invalid_request_error", "job_not_found"),
    (MappingNotFound, 404, "invalid_request_error", "mapping_not_found"),
    (FormatError, 400, "invalid_request_error", "invalid_file"),
    (SteeringError, 422, "invalid_request_error", "invalid_steering"),
    (MappingError, 422, "invalid_request_error", "invalid_mapping"),
    (RequestRejected, 400, "invalid_request_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),  # engine limits, bad sampling values
    (VersionConflict, 409, "invalid_request_error", "version_conflict"),
    (PersonaExists, 409, "invalid_request_error", "persona_exists"),
    (ModelExists, 409, "invalid_request_error", "model_exists"),
    (ModelInUse, 409, "invalid_request_error", "model_in_use"),
    (StoreUnavailable, 503, "server_error", "store_unavailable"),
]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for error in telling_errors(list(exc.errors()))[:5]:
        location = field_path(error.get("loc", ())) or ""
        param = param or location or None
        parts.append(f"{location}: {error.get('msg')}" if location else str(error.get("msg")))
    return "; ".join(parts) or "invalid request", param


def _json_error(exc: RequestValidationError) -> str | None:
    """The message for a body that is not JSON at all (FastAPI reports it as a validation error)."""
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            position = next((item for item in error.get("loc", ()) if isinstance(item, int)), None)
            reason = error.get("ctx", {}).get("error", "JSON decode error")
            where = f" at character {position}" if position is not None else ""
            return f"the request body is not valid JSON: {reason}{where}"
    return None


def _unparseable_body(exc: StarletteHTTPException) -> str | None:
    """The message for a body FastAPI could not decode (not UTF-8, nested too deeply), else None."""
    if exc.status_code != 400 or exc.__cause__ is None:
        return None
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return "the request body is not valid JSON: it is not UTF-8 text"
    return f"the request body cannot be parsed as JSON ({type(exc.__cause__).__name__})"


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    for exc_class, status, error_type, code in _MAPPING:

        async def handler(
            _request: Request,
            exc: Exception,
            status: int = status,
            error_type: str = error_type,
            code: Any = code,
        ) -> AsciiJSONResponse:
            return error_response(status, str(exc), error_type, getattr(exc, "param", None), code)

        app.add_exception_handler(exc_class, handler)

    async def overloaded(request: Request, exc: Exception) -> AsciiJSONResponse:
        metrics.requests_refused.labels("429").inc()
        retry = str(getattr(exc, "retry_after_seconds", 1))
        return error_response(429, str(exc), "rate_limit_error", None, "overloaded", {"Retry-After": retry})

    async def engine_down(_request: Request, exc: Exception) -> AsciiJSONResponse:
        # Never a bare 500: the request was fine, the engine failed it; a retry may succeed.
        code = "engine_error"
        message = str(exc)
        if isinstance(exc, EngineRestarting):
            code = "engine_restarting"
        elif isinstance(exc, EngineDied):
            code, message = "engine_restarting", f"{exc}; the server restarts it, retry later"
        retry = str(getattr(exc, "retry_after_seconds", 5))
        return error_response(503, message, "server_error", None, code, {"Retry-After": retry})

    async def api_error(_request: Request, exc: Exception) -> AsciiJSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc.status, str(exc), exc.error_type, None, exc.code)

    async def validation(_request: Request, exc: Exception) -> AsciiJSONResponse:
        assert isinstance(exc, RequestValidationError)
        if (unparseable := _json_error(exc)) is not None:  # one answer for every unparseable body
            return error_response(400, unparseable, "invalid_request_error", None, "invalid_json")
        message, param = _validation_message(exc)
        return error_response(422, message, "invalid_request_error", param, "invalid_value")

    async def http_error(request: Request, exc: Exception) -> AsciiJSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if (unparseable := _unparseable_body(exc)) is not None:
            return error_response(400, unparseable, "invalid_request_error", None, "invalid_json")
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = allow_header(request, exc.headers) if exc.status_code == 405 else exc.headers
        return error_response(exc.status_code, str(exc.detail), error_type, None, None, headers)

    async def unexpected(_request: Request, exc: Exception) -> AsciiJSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", "server_error")

    app.add_exception_handler(Overloaded, overloaded)
    for engine_error in (EngineFault, EngineRestarting):
        app.add_exception_handler(engine_error, engine_down)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
