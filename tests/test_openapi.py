"""/openapi.json documents every route's answer and the errors it can give; the wire stays as it was.

The document is built in process from create_app, without the lifespan (no model is loaded), so
this is a quick test: it fails when a route loses its response model or an error declaration.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from server.api.errors import ErrorResponse, error_response
from server.app import create_app
from server.engine.base import FinishReason, TokenChunk, TokenLogprob
from server.serving.responses import Answer, ResponseShape, usage
from server.settings import Settings

V1, ADMIN = {401}, {401, 403}
COMPLETION_ERRORS = V1 | {400, 404, 413, 422, 429, 503}
WRITE_ERRORS = ADMIN | {400, 404, 409, 413, 422, 503}

# (method, path, success status, its JSON schema or media type, every error status it can give)
ROUTES = [
    ("post", "/v1/chat/completions", "200", "ChatCompletion", COMPLETION_ERRORS),
    ("post", "/v1/completions", "200", "TextCompletion", COMPLETION_ERRORS),
    ("get", "/v1/models", "200", "ModelList", V1),
    ("get", "/v1/models/{model_id}", "200", "ModelCard", V1 | {404}),
    ("get", "/v1/personas", "200", "PersonaSummaryList", V1 | {404, 503}),
    ("put", "/admin/personas/{name}", "200", "Persona", WRITE_ERRORS),
    ("get", "/admin/personas/{name}", "200", "PersonaWithVectors", ADMIN | {404, 422, 503}),
    ("delete", "/admin/personas/{name}", "204", None, ADMIN | {400, 404, 409, 422, 503}),
    ("get", "/admin/personas/{name}/versions", "200", "PersonaList", ADMIN | {404, 422, 503}),
    ("post", "/admin/personas/{name}/restore", "200", "Persona", WRITE_ERRORS),
    ("post", "/admin/personas/{name}/import", "200", "Persona", WRITE_ERRORS),
    ("get", "/admin/personas/{name}/export", "200", "application/octet-stream",
     ADMIN | {400, 404, 422, 503}),
    ("get", "/admin/personas/{name}/calibration.png", "200", "image/png", ADMIN | {404, 422, 503}),
    ("get", "/admin/personas", "200", "PersonaList", ADMIN | {404, 503}),
    ("post", "/admin/personas/{name}/extract", "202", "JobHandle", ADMIN | {400, 404, 413, 422}),
    ("post", "/admin/personas/{name}/map", "201", "Persona", ADMIN | {400, 404, 409, 413, 422, 503}),
    ("post", "/admin/personas/{name}/bake", "202", "JobHandle", ADMIN | {400, 404, 409, 413, 422}),
    ("get", "/admin/jobs/{job_id}", "200", "JobStatus", ADMIN | {404}),
    ("delete", "/admin/jobs/{job_id}", "200", "JobStatus", ADMIN | {404}),
    ("post", "/admin/mappings", "202", "JobHandle", ADMIN | {400, 404, 413, 422}),
    ("get", "/admin/mappings", "200", "MappingList", ADMIN | {503}),
    ("get", "/admin/mappings/{mapping_id}", "200", "Mapping", ADMIN | {400, 404, 503}),
    ("get", "/admin/mappings/{mapping_id}/diagnostics.png", "200", "image/png", ADMIN | {400, 404, 503}),
    ("delete", "/admin/mappings/{mapping_id}", "204", None, ADMIN | {400, 404, 503}),
    ("get", "/health", "200", "Health", set()),
    ("get", "/ready", "200", "Readiness", {503}),  # its 503 is a Readiness, not an error object
]  # fmt: skip


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")))
    return app.openapi()


def _ref_name(ref: str) -> str:
    assert ref.startswith("#/components/schemas/"), ref
    return ref.rsplit("/", 1)[-1]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.mark.parametrize(("method", "path", "status", "success", "failures"), ROUTES,
                         ids=[f"{r[0]} {r[1]}" for r in ROUTES])  # fmt: skip
def test_route_documents_its_answer_and_errors(
    schema: dict[str, Any], method: str, path: str, status: str, success: str | None, failures: set[int]
) -> None:
    responses = schema["paths"][path][method]["responses"]
    content = responses[status].get("content", {})
    if success is None:
        assert not content, f"{status} has no body"
    elif "/" in success:
        assert list(content) == [success] and content[success]["schema"]["format"] == "binary"
    else:
        assert _ref_name(content["application/json"]["schema"]["$ref"]) == success
    documented = {int(code) for code in responses if code != status}
    assert documented == failures
    for code in failures - ({503} if path == "/ready" else set()):
        body = responses[str(code)]["content"]["application/json"]["schema"]
        assert _ref_name(body["$ref"]) == "ErrorResponse", code
        assert responses[str(code)]["description"], code


def test_ready_documents_its_503_as_readiness(schema: dict[str, Any]) -> None:
    ready = schema["paths"]["/ready"]["get"]["responses"]
    assert set(ready) == {"200", "503"}
    assert _ref_name(ready["503"]["content"]["application/json"]["schema"]["$ref"]) == "Readiness"


@pytest.mark.parametrize(("path", "chunk"), [("/v1/chat/completions", "ChatCompletionChunk"),
                                             ("/v1/completions", "CompletionChunk")])  # fmt: skip
def test_streams_are_documented_as_server_sent_events(schema: dict[str, Any], path: str, chunk: str) -> None:
    ok = schema["paths"][path]["post"]["responses"]["200"]
    assert _ref_name(ok["content"]["text/event-stream"]["schema"]["$ref"]) == chunk
    assert "[DONE]" in ok["description"]


def test_every_route_is_in_the_table(schema: dict[str, Any]) -> None:
    documented = {(method, path) for path, operations in schema["paths"].items() for method in operations}
    assert documented - {(method, path) for method, path, *_ in ROUTES} == {("get", "/metrics")}


def test_every_reference_resolves_and_no_foreign_422_is_left(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    for ref in _refs(schema):
        assert _ref_name(ref) in components, ref
    # FastAPI's own validation-error shape is never sent: errors.py answers with the OpenAI object.
    assert "HTTPValidationError" not in components and "ValidationError" not in components


def test_completion_schemas_keep_nullable_and_optional_fields_apart(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    chat = components["ChatCompletion"]
    assert {"persona", "usage", "choices"} <= set(chat["required"])  # present, persona maybe null
    assert "persona_scores" not in chat["required"]  # absent unless persona_monitor asked
    choice = components["ChatChoice"]
    # logprobs: always present, null unless asked
    assert "logprobs" in choice["required"]
    assert {"type": "null"} in choice["properties"]["logprobs"]["anyOf"]
    assert "usage" not in components["ChatCompletionChunk"].get("required", [])


def test_the_error_model_is_the_error_body() -> None:
    response = error_response(404, "no such persona", param="persona", code="persona_not_found")
    body = json.loads(response.body)
    assert ErrorResponse.model_validate(body).model_dump() == body
    assert list(body["error"]) == list(ErrorResponse.model_fields["error"].annotation.model_fields)


# The wire of the completion objects, byte for byte as before they became models.
PIRATE = {"name": "pirate", "strength": 2.0, "version": 1, "layers": [1]}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
TOTALS = usage(5, 3)
LOGPROB = TokenLogprob(9, "é", -0.5, ((9, "é", -0.5), (3, "a", -1.5)))
HEAD = {"created": 1700000000, "model": "m"}


def _shape(chat: bool) -> ResponseShape:
    return ResponseShape(chat=chat, response_id="id-1", created=1700000000, model="m")


def _wire(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))  # key order included


def _answers(text: str = "hi!", logprobs: list[TokenLogprob] | None = None) -> list[Answer]:
    answer = Answer(0, logprobs=logprobs)
    answer.add(TokenChunk(text, (7,), 5, 3, FinishReason.STOP))
    return [answer]


def test_chat_completion_wire() -> None:
    body = _shape(True).completion(_answers(), TOTALS, None)
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi!"}, "finish_reason": "stop",
              "logprobs": None}  # fmt: skip
    expected = {"id": "id-1", "object": "chat.completion", **HEAD, "choices": [choice], "usage": USAGE,
                "persona": None}  # fmt: skip
    assert _wire(body) == _wire(expected)
    scored = _shape(True).completion(_answers(), TOTALS, [PIRATE], {"pirate": 0.5})
    assert _wire(scored) == _wire({**expected, "persona": [PIRATE], "persona_scores": {"pirate": 0.5}})


def test_text_completion_wire() -> None:
    body = _shape(False).completion(_answers(), TOTALS, PIRATE)
    choice = {"index": 0, "text": "hi!", "finish_reason": "stop", "logprobs": None}
    expected = {"id": "id-1", "object": "text_completion", **HEAD, "choices": [choice], "usage": USAGE,
                "persona": PIRATE}  # fmt: skip
    assert _wire(body) == _wire(expected)


def test_chunk_wire() -> None:
    shape = _shape(True)
    head = {"id": "id-1", "object": "chat.completion.chunk", **HEAD}
    first = shape.chunk("h", None, None, first=True)
    delta = {"role": "assistant", "content": "h"}
    choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
    assert _wire(first) == _wire({**head, "choices": [choice], "persona": None})
    final = shape.chunk("", "length", PIRATE, scores={"pirate": -1.0})
    choice = {"index": 0, "delta": {"content": ""}, "finish_reason": "length", "logprobs": None}
    assert _wire(final) == _wire({**head, "choices": [choice], "persona": PIRATE,
                                  "persona_scores": {"pirate": -1.0}})  # fmt: skip
    assert _wire(shape.usage_chunk(TOTALS)) == _wire({**head, "choices": [], "usage": USAGE})
    text = _shape(False).chunk("x", None, None, first=True)
    choice = {"index": 0, "text": "x", "finish_reason": None, "logprobs": None}
    assert _wire(text) == _wire({"id": "id-1", "object": "text_completion", **HEAD, "choices": [choice],
                                 "persona": None})  # fmt: skip


@pytest.mark.parametrize("chat", [True, False])
def test_what_the_builder_writes_is_the_documented_model_field_for_field(chat: bool) -> None:
    # ResponseShape writes dicts for speed; the models are the definition they must match, key order
    # included, as a route's response_model would dump them.
    from server.serving.responses import ChatCompletion, ChatCompletionChunk, CompletionChunk, TextCompletion

    shape = _shape(chat)
    whole, chunk = (ChatCompletion, ChatCompletionChunk) if chat else (TextCompletion, CompletionChunk)
    written = [
        (whole, shape.completion(_answers(), TOTALS, None)),
        (whole, shape.completion(_answers(), TOTALS, [PIRATE, PIRATE], {"pirate": 0.5})),
        (whole, shape.completion(_answers(logprobs=[LOGPROB]), TOTALS, None)),
        (chunk, shape.chunk("h", None, PIRATE, first=True)),
        (chunk, shape.chunk("i", "length", None, scores={"pirate": -0.25})),
        (chunk, shape.chunk("é", None, None, index=3, logprobs=[LOGPROB], offset=2)),
        (chunk, shape.usage_chunk(TOTALS)),
    ]
    for model, body in written:
        dumped = model.model_validate(body).model_dump(mode="json", exclude_unset=True)
        assert _wire(dumped) == _wire(body)
