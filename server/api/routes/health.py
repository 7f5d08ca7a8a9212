"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from persona_store.errors import StoreUnavailable
from server.api.errors import AsciiJSONResponse

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Any:
    state = request.app.state
    models = state.registry.ids
    try:
        await state.store.ping()
        store = "ok"
    except StoreUnavailable as exc:
        store = str(exc)
    ready = bool(models) and store == "ok"
    body = {
        "status": "ready" if ready else "unavailable",
        "models": models,
        "store": store,
        "change_feed": state.store.feed_state,  # informational: the version probe covers a down feed
    }
    return AsciiJSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
