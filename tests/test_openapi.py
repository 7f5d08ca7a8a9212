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
from server.api.openapi_rules import schema_nodes
from server.app import create_app
from server.engine.base import FinishReason, TokenChunk, TokenLogprob
from server.serving.protocol.responses import Answer, ResponseShape, usage
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
    ("post", "/admin/personas/{name}/extract", "202", "JobHandle", ADMIN | {400, 404, 413, 422, 429}),
    ("post", "/admin/personas/{name}/map", "202", "JobHandle", ADMIN | {400, 404, 409, 413, 422, 429, 503}),
    ("post", "/admin/personas/{name}/bake", "202", "JobHandle", ADMIN | {400, 404, 409, 413, 422, 429}),
    ("delete", "/admin/models/{model}", "200", "ModelDeleted", ADMIN | {400, 404, 409}),
    ("get", "/admin/jobs/{job_id}", "200", "JobStatus", ADMIN | {404}),
    ("delete", "/admin/jobs/{job_id}", "200", "JobStatus", ADMIN | {404}),
    ("post", "/admin/mappings", "202", "JobHandle", ADMIN | {400, 404, 413, 422, 429}),
    ("get", "/admin/mappings", "200", "MappingList", ADMIN | {503}),
    ("get", "/admin/mappings/{mapping_id}", "200", "Mapping", ADMIN | {400, 404, 503}),
    ("get", "/admin/mappings/{mapping_id}/diagnostics.png", "200", "image/png", ADMIN | {400, 404, 503}),
    ("delete", "/admin/mappings/{mapping_id}", "204", None, ADMIN | {400, 404, 503}),
    ("get", "/health", "200", "Health", {503}),  # its 503 is a Health: every engine is down
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


@pytest.mark.parametrize(
    ("method", "path", "status", "success", "failures"), ROUTES, ids=[f"{r[0]} {r[1]}" for r in ROUTES]
)
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
    for code in failures - ({503} if path in ("/health", "/ready") else set()):
        body = responses[str(code)]["content"]["application/json"]["schema"]
        assert _ref_name(body["$ref"]) == "ErrorResponse", code
        assert responses[str(code)]["description"], code


def test_ready_documents_its_503_as_readiness(schema: dict[str, Any]) -> None:
    ready = schema["paths"]["/ready"]["get"]["responses"]
    assert set(ready) == {"200", "503"}
    assert _ref_name(ready["503"]["content"]["application/json"]["schema"]["$ref"]) == "Readiness"


@pytest.mark.parametrize(
    ("path", "chunk"),
    [("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "CompletionChunk")],
)
def test_streams_are_documented_as_server_sent_events(schema: dict[str, Any], path: str, chunk: str) -> None:
    ok = schema["paths"][path]["post"]["responses"]["200"]
    event = ok["content"]["text/event-stream"]["schema"]  # one event: its data is a chunk as JSON
    done, as_json = event["properties"]["data"]["anyOf"]
    assert done == {"const": "[DONE]"} and as_json["contentMediaType"] == "application/json"
    documents = [_ref_name(option["$ref"]) for option in as_json["contentSchema"]["anyOf"]]
    assert documents == [chunk, "ErrorResponse"]  # a stream that fails ends with the error object
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
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "hi!"},
        "finish_reason": "stop",
        "logprobs": None,
    }
    expected = {
        "id": "id-1",
        "object": "chat.completion",
        **HEAD,
        "choices": [choice],
        "usage": USAGE,
        "persona": None,
    }
    assert _wire(body) == _wire(expected)
    scored = _shape(True).completion(_answers(), TOTALS, [PIRATE], {"pirate": 0.5})
    assert _wire(scored) == _wire({**expected, "persona": [PIRATE], "persona_scores": {"pirate": 0.5}})


def test_text_completion_wire() -> None:
    body = _shape(False).completion(_answers(), TOTALS, PIRATE)
    choice = {"index": 0, "text": "hi!", "finish_reason": "stop", "logprobs": None}
    expected = {
        "id": "id-1",
        "object": "text_completion",
        **HEAD,
        "choices": [choice],
        "usage": USAGE,
        "persona": PIRATE,
    }
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
    assert _wire(final) == _wire(
        {**head, "choices": [choice], "persona": PIRATE, "persona_scores": {"pirate": -1.0}}
    )
    assert _wire(shape.usage_chunk(TOTALS)) == _wire({**head, "choices": [], "usage": USAGE})
    text = _shape(False).chunk("x", None, None, first=True)
    choice = {"index": 0, "text": "x", "finish_reason": None, "logprobs": None}
    assert _wire(text) == _wire(
        {"id": "id-1", "object": "text_completion", **HEAD, "choices": [choice], "persona": None}
    )


@pytest.mark.parametrize("chat", [True, False])
def test_what_the_builder_writes_is_the_documented_model_field_for_field(chat: bool) -> None:
    # ResponseShape writes dicts for speed; the models are the definition they must match, key order
    # included, as a route's response_model would dump them.
    from server.serving.protocol.responses import (
        ChatCompletion,
        ChatCompletionChunk,
        CompletionChunk,
        TextCompletion,
    )

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


# What the server enforces, stated (issue 29, item 7): a fuzzer that follows the schema is never
# refused for a pattern or bound the schema kept to itself (the run is in test_api_lifecycle.py).
CONDITIONAL_WRITES = [
    ("put", "/admin/personas/{name}"), ("delete", "/admin/personas/{name}"),
    ("post", "/admin/personas/{name}/restore"), ("post", "/admin/personas/{name}/import"),
]  # fmt: skip


def _parameter(schema: dict[str, Any], method: str, path: str, name: str) -> dict[str, Any]:
    return next(p for p in schema["paths"][path][method]["parameters"] if p["name"] == name)


def test_patterns_the_server_checks_are_stated(schema: dict[str, Any]) -> None:
    from persona_store.mappings import MAPPING_ID_PATTERN
    from server.api.routes.admin import IF_MATCH_PATTERN

    for method in ("get", "delete"):
        assert _parameter(schema, method, "/admin/mappings/{mapping_id}", "mapping_id")["schema"][
            "pattern"
        ] == (MAPPING_ID_PATTERN)
    mapping_id = schema["components"]["schemas"]["PersonaMapRequest"]["properties"]["mapping_id"]
    assert {"type": "string", "pattern": MAPPING_ID_PATTERN} in mapping_id["anyOf"]
    for method, path in CONDITIONAL_WRITES:
        if_match = _parameter(schema, method, path, "if-match")["schema"]
        assert (if_match["type"], if_match["pattern"]) == ("string", IF_MATCH_PATTERN), path


def test_no_parameter_or_form_field_offers_null(schema: dict[str, Any]) -> None:
    # A header, query or form value is absent or a string: "null" was sent as text and refused.
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                assert "null" not in json.dumps(parameter["schema"]), (method, path, parameter["name"])
    form = schema["components"]["schemas"]["Body_import_persona_admin_personas__name__import_post"]
    assert "null" not in json.dumps(form["properties"])


def test_bounds_are_json_schema_keywords(schema: dict[str, Any]) -> None:
    # pydantic writes a bound around a validated alias (Int | None) as ge/le, which no validator reads.
    for node in schema_nodes(schema):
        assert not {"ge", "le", "gt", "lt"} & set(node), node
    seed = schema["components"]["schemas"]["ExtractionRequest"]["properties"]["seed"]
    assert (seed["minimum"], seed["maximum"]) == (-(2**53 - 1), 2**53 - 1)
    folds = schema["components"]["schemas"]["MappingFitRequest"]["properties"]["folds"]["anyOf"][0]
    assert (folds["minimum"], folds["maximum"]) == (2, 20)


def test_rules_between_fields_are_stated(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    assert len(components["PersonaRuleIn"]["oneOf"]) == 2  # exactly one of above and below
    chat = json.dumps(components["ChatCompletionRequest"]["allOf"])
    for field in ("persona_strength", "persona_monitor_tokens", "persona_target", "top_logprobs"):
        assert field in chat, field
    assert "echo" in json.dumps(components["CompletionRequest"]["allOf"])


def test_the_served_models_bound_their_requests(schema: dict[str, Any]) -> None:
    from server.admin.persona_admin import largest_value
    from server.api.openapi_rules import Served, add_served_bounds

    served = Served(
        steerable_layers=[1, 2],
        blocks=3,
        hidden_sizes=(64, 64),
        max_strength=50.0,
        max_tokens_cap=16,
        default_max_tokens=8,
        max_answers=4,
        constrained_decoding=False,
        closed_loop=True,
        vocab_size=400,
    )
    components = json.loads(json.dumps(schema["components"]["schemas"]))
    add_served_bounds(components, served)
    upload = components["PersonaUpload"]["properties"]
    assert upload["layers"]["propertyNames"] == {"pattern": "^(1|2)$"}
    vector = upload["layers"]["additionalProperties"]
    assert (vector["minItems"], vector["maxItems"], vector["items"]["maximum"]) == (
        64,
        64,
        largest_value(50.0),
    )
    assert (upload["default_strength"]["minimum"], upload["default_strength"]["maximum"]) == (-50.0, 50.0)
    chat = components["ChatCompletionRequest"]["properties"]
    assert chat["n"]["maximum"] == 4 and chat["max_tokens"]["anyOf"][0]["maximum"] == 16
    assert chat["stop_token_ids"]["anyOf"][0]["items"]["maximum"] == 399
    assert components["ResponseFormat"]["properties"]["type"]["enum"] == ["text"]  # no engine constrains JSON
    assert components["ExtractionRequest"]["properties"]["layers"]["anyOf"][0]["items"]["enum"] == [1, 2]
    fit = components["MappingFitRequest"]["properties"]["layers"]
    assert fit["propertyNames"] == {"pattern": "^(0|1|2)$"}
