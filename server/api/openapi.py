"""The OpenAPI document: what routes declare about their answers, completed at run time.

Routes declare their success model and, with ``errors(...)``, the error statuses they can give, each
with the OpenAI error object. The document is then completed with what is only known at run time
(served models, limits), so clients and fuzzers see the real choices: a `model` field lists the
served ids, `max_tokens` states the server's cap.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.api.errors import ErrorResponse
from server.api.openapi_rules import complete_rules
from server.api.services import services_of
from server.serving.protocol.responses import STREAM_CHUNKS
from server.settings import Settings

Responses = dict[int | str, dict[str, Any]]

_ERRORS = {
    400: "Bad request: a value outside the server's limits, a malformed header or file.",
    401: "Missing or wrong key (Authorization: Bearer <key>).",
    403: "No admin key is configured and the client is not on loopback.",
    404: "Unknown model, persona, job or mapping.",
    409: "If-Match names another version than the current one.",
    413: "The request body is larger than the server accepts.",
    422: "The body or a parameter does not validate, or the steering does not fit the model.",
    429: "Every batch row and queue place of the model is taken: retry after Retry-After seconds.",
    503: "The persona store cannot be reached, or the model's engine failed the request or is "
    "restarting after it died: retry after Retry-After seconds.",
}
_SCHEMA_REF = "#/components/schemas/{model}"


def errors(*statuses: int) -> Responses:
    """The ``responses=`` of a route or router: these statuses answer with the OpenAI error object."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


def event_stream(chunk: type[BaseModel]) -> Responses:
    """A 200 that, when the request set ``stream``, is server-sent events of ``chunk`` objects.

    The schema of text/event-stream describes one event (OpenAPI 3.2's reading, which fuzzers
    check): its data is a chunk as JSON, the error object when the stream fails after its first
    bytes, or the final [DONE]."""
    refs = [{"$ref": _SCHEMA_REF.format(model=model)} for model in (chunk.__name__, "ErrorResponse")]
    as_json = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": refs}}
    data = {"anyOf": [{"const": "[DONE]"}, as_json]}
    schema = {"type": "object", "required": ["data"], "properties": {"data": data}}
    description = (
        f"A JSON object; or, with stream=true, text/event-stream whose events are `data: <{chunk.__name__}>`"
        " and finally `data: [DONE]`."
    )
    return {200: {"description": description, "content": {"text/event-stream": {"schema": schema}}}}


def binary(media_type: str, description: str) -> Responses:
    schema = {"type": "string", "format": "binary"}
    return {200: {"description": description, "content": {media_type: {"schema": schema}}}}


def _add_stream_chunks(schema: dict[str, Any]) -> None:
    # No route returns the chunk models as JSON, so FastAPI does not collect them: add them (and the
    # models they use) to the components that event_stream() refers to.
    _, chunk_schemas = models_json_schema(
        [(model, "serialization") for model in STREAM_CHUNKS], ref_template=_SCHEMA_REF
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in chunk_schemas.get("$defs", {}).items():
        components.setdefault(name, definition)


def _drop_default_422(schema: dict[str, Any]) -> None:
    # FastAPI documents a 422 of its own shape for every route with parameters; the server never
    # sends that shape (errors.py answers with the OpenAI error object), and routes that can give a
    # 422 declare it themselves.
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "HTTPValidationError" in str(responses.get("422", {})):
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _set_max(prop: dict[str, Any], maximum: int) -> None:
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum


def _add_runtime_choices(app: FastAPI, settings: Settings, schema: dict[str, Any]) -> None:
    services = services_of(app)
    models = services.registry.ids if services is not None else []
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("ChatCompletionRequest", "CompletionRequest", "PersonaUpload"):
        properties = schemas.get(name, {}).get("properties", {})
        if models and "model" in properties:
            properties["model"]["enum"] = models
        for field in ("max_tokens", "max_completion_tokens"):
            if field in properties:
                _set_max(properties[field], settings.max_tokens_cap)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _drop_default_422(schema)
        _add_stream_chunks(schema)
        _add_runtime_choices(app, settings, schema)
        complete_rules(app, schema)
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
