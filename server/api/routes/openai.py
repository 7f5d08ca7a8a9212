"""OpenAI-compatible routes: thin mappings from protocol models to the completion service."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.api.auth import require_api_key
from server.api.errors import APIError, ascii_json_by_choice
from server.api.openapi import errors, event_stream
from server.api.protocol import ChatCompletionRequest, CompletionRequest, PersonaRuleIn, _CompletionRequest
from server.api.resources import ModelCard, ModelList, PersonaSummaryList
from server.serving.completions import CompletionService
from server.serving.errors import RequestRejected
from server.serving.requests import (
    ChatMessage,
    CompletionJob,
    JsonOutput,
    PersonaTerm,
    SteeringOverride,
    TargetTerm,
    WhenRule,
)
from server.serving.responses import ChatCompletion, ChatCompletionChunk, CompletionChunk, TextCompletion

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=errors(401))
# What a completion can answer besides 401: limits (400), unknown model or persona (404), a body
# over the cap (413), a body that does not validate or steering that does not fit (422), a full
# queue (429), the store down (503).
_COMPLETION_ERRORS = errors(400, 404, 413, 422, 429, 503)


def _service(request: Request) -> CompletionService:
    return request.app.state.completions


def _json_output(body: _CompletionRequest) -> JsonOutput | None:
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JsonOutput()
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise RequestRejected("response_format json_schema needs json_schema.schema", param="response_format")
    return JsonOutput(response_format.json_schema.schema_)


def _job(body: _CompletionRequest, logprobs: int | None, **prompt: Any) -> CompletionJob:
    if body.best_of is not None and body.best_of != body.n:
        raise RequestRejected("best_of other than n is not supported (vLLM dropped it too)", param="best_of")
    persona = body.persona
    if isinstance(persona, list):
        persona = [PersonaTerm(term.name, term.strength) for term in persona]
    steering = None
    if body.steering is not None:
        layers = tuple(body.steering.layers) if body.steering.layers is not None else None
        steering = SteeringOverride(layers=layers, positions=body.steering.positions)
    return CompletionJob(
        model=body.model,
        n=body.n,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        stop=body.stop_strings(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        min_tokens=body.min_tokens or 0,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        tokens_as_ids=body.return_tokens_as_token_ids,
        json_output=_json_output(body),
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        persona=persona,
        persona_strength=body.persona_strength,
        steering=steering,
        persona_monitor=tuple(body.persona_monitor or ()),
        monitor_tokens=body.persona_monitor_tokens,
        persona_target=_target(body),
        persona_when=tuple(_rule(rule) for rule in body.persona_when or ()),
        **prompt,
    )


def _target(body: _CompletionRequest) -> TargetTerm | None:
    target = body.persona_target
    if target is None:
        return None
    return TargetTerm(target.name, target.score, target.strength, target.max_strength, target.gain)


def _rule(rule: PersonaRuleIn) -> WhenRule:
    above = rule.above is not None
    threshold = rule.above if rule.above is not None else rule.below
    assert threshold is not None  # the protocol model holds exactly one
    steer = PersonaTerm(rule.steer.name, rule.steer.strength)
    return WhenRule(rule.monitor, threshold, above, steer, rule.for_tokens)


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


async def _respond(request: Request, job: CompletionJob) -> Any:
    service = _service(request)
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
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    messages = [ChatMessage(m.role, m.text()) for m in body.messages]
    if body.max_tokens is None and body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestRejected("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await _respond(request, _job(body, logprobs, messages=messages))


@router.post(
    "/completions",
    response_model=TextCompletion,
    response_model_exclude_unset=True,
    responses={**_COMPLETION_ERRORS, **event_stream(CompletionChunk)},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    prompt = body.prompt
    if isinstance(prompt, list):  # never empty: the protocol says so
        prompt = prompt[0] if len(prompt) == 1 else tuple(prompt)
    return await _respond(request, _job(body, body.logprobs, prompt=prompt, echo=body.echo))


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    registry = request.app.state.registry
    return ModelList(data=[_model_card(b.info, registry.parent(b.info.id)) for b in registry])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=errors(404))
async def get_model(model_id: str, request: Request) -> ModelCard:
    registry = request.app.state.registry
    return _model_card(registry.get(model_id).info, registry.parent(model_id))


@router.get("/personas", response_model=PersonaSummaryList, responses=errors(404, 503))
async def list_personas(request: Request, model: str | None = None) -> dict[str, Any]:
    """The stored personas (of one model, if given); their checksums are for the admin API only."""
    infos = await request.app.state.persona_admin.list(model)
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
