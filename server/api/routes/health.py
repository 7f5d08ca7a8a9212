"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from persona_store.errors import StoreUnavailable
from server.api.auth import require_metrics_key
from server.api.errors import APIError, AsciiJSONResponse
from server.api.openapi import errors
from server.api.resources import Health, Readiness

router = APIRouter()
_TEXT = {"type": "string"}


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "No served model's engine can serve (all died)."}},
)
async def health(request: Request) -> Any:
    """Liveness: the process answers and some engine can serve. One dead engine among several is a
    readiness matter (it restarts by itself); every engine dead is the process's, for its replacement."""
    registry = getattr(request.app.state, "registry", None)
    down = registry.down if registry is not None else {}
    alive = registry is None or not registry.ids or len(down) < len(registry.ids)
    body = {"status": "ok" if alive else "unavailable", "engines_down": down}
    return AsciiJSONResponse(body, status_code=200 if alive else 503)


@router.get(
    "/ready",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "No model is served, a model's engine is down, or the store is unreachable.",
        }
    },
)
async def ready(request: Request) -> Any:
    state = request.app.state
    models = state.registry.ids
    down = state.registry.down
    try:
        await state.store.ping()
        store = "ok"
    except StoreUnavailable as exc:
        store = str(exc)
    ready = bool(models) and store == "ok" and not down
    body = {
        "status": "ready" if ready else "unavailable",
        "models": models,
        "store": store,
        "change_feed": state.store.feed_state,  # informational: the version probe covers a down feed
        "engines_down": down,
    }
    return AsciiJSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_key)],
    responses={
        200: {"description": "Prometheus metrics.", "content": {"text/plain": {"schema": _TEXT}}},
        **errors(401, 404),
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics; they name the personas asked for (--metrics-key, --metrics-port)."""
    if request.app.state.settings.metrics_port is not None:
        raise APIError(
            404,
            "/metrics is served on the metrics port (--metrics-port)",
            "invalid_request_error",
            "not_found",
        )
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
