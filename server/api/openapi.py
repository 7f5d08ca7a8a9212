"""The OpenAPI document, completed with what is only known at run time (served models, limits).

Clients and fuzzers then see the real choices: a `model` field lists the served ids, `max_tokens`
states the server's cap.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi


def _set_max(prop: dict[str, Any], maximum: int) -> None:
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum


def install_openapi(app: FastAPI) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        state = app.state
        models = state.registry.ids if hasattr(state, "registry") else []
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("ChatCompletionRequest", "CompletionRequest", "PersonaUpload"):
            properties = schemas.get(name, {}).get("properties", {})
            if models and "model" in properties:
                properties["model"]["enum"] = models
            for field in ("max_tokens", "max_completion_tokens"):
                if field in properties:
                    _set_max(properties[field], state.settings.max_tokens_cap)
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
