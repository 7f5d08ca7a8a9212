"""OpenAI-compatible routes: a protocol request turns itself into a job for the completion service."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.api.auth import require_api_key
from server.api.errors import APIError, ascii_json_by_choice
from server.api.openapi import errors, event_stream
from server.api.resources import ModelCard, ModelList, PersonaSummaryList
from server.api.services import ServicesDep
from server.serving.completion_job import CompletionJob
from server.serving.completions import CompletionService
from server.serving.protocol.requests import ChatCompletionRequest, CompletionRequest
from server.serving.protocol.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    CompletionChunk,
    TextCompletion,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=errors(401))
# What a completion can answer besides 401: limits (400), unknown model or persona (404), a body
# over the cap (413), a body that does not validate or steering that does not fit (422), a full
# queue (429), the store down (503).
_COMPLETION_ERRORS = errors(400, 404, 413, 422, 429, 503)


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Run ``work``; cancel it (and so its generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if not task.done():
        task.cancel()
        raise APIError(499, "the client closed the request", "invalid_request_error", "client_closed")
    return task.result()


async def _respond(request: Request, service: CompletionService, job: CompletionJob) -> Any:
    if job.stream:
        # A stream waits for its first chunk before answering: a client that leaves meanwhile
        # takes the request out of the queue at once.
        events = await _until_disconnect(request, service.stream(job))
        return StreamingResponse(events, media_type="text/event-stream")
    completion = await _until_disconnect(request, service.complete(job))
    # Encoded off the event loop, a choice at a time: a large answer must not stall other clients.
    body = await asyncio.to_thread(ascii_json_by_choice, completion)
    return Response(body, media_type="application/json")


# exclude_unset: the service's dict is the wire; fields it left out (persona_scores) stay out.
@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_unset=True,
    responses={**_COMPLETION_ERRORS, **event_stream(ChatCompletionChunk)},
)
async def chat_completions(body: ChatCompletionRequest, request: Request, services: ServicesDep) -> Any:
    return await _respond(request, services.completions, body.to_job())


@router.post(
    "/completions",
    response_model=TextCompletion,
    response_model_exclude_unset=True,
    responses={**_COMPLETION_ERRORS, **event_stream(CompletionChunk)},
)
async def completions(body: CompletionRequest, request: Request, services: ServicesDep) -> Any:
    return await _respond(request, services.completions, body.to_job())


@router.get("/models", response_model=ModelList)
async def list_models(services: ServicesDep) -> ModelList:
    registry = services.registry
    return ModelList(data=[_model_card(b.info, registry.parent(b.info.id)) for b in registry])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=errors(404))
async def get_model(model_id: str, services: ServicesDep) -> ModelCard:
    registry = services.registry
    return _model_card(registry.get(model_id).info, registry.parent(model_id))


@router.get("/personas", response_model=PersonaSummaryList, responses=errors(404, 503))
async def list_personas(services: ServicesDep, model: str | None = None) -> dict[str, Any]:
    """The stored personas (of one model, if given); their checksums are for the admin API only."""
    infos = await services.persona_admin.list(model)
    data = [{key: value for key, value in info.to_dict().items() if key != "checksum"} for info in infos]
    return {"object": "list", "data": data}


def _model_card(info: Any, parent: str | None) -> ModelCard:
    return ModelCard(
        id=info.id,
        backend=info.backend,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        max_model_len=info.max_context,
        parent=parent,
    )
