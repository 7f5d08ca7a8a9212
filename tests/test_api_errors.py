"""Every kind of bad input gets a clear 4xx OpenAI error, and a rejected write changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from testkit.server_process import ServerProcess
from tests.api_helpers import (
    ADMIN_KEY,
    API_KEY,
    LLAMA,
    QUESTION,
    assert_openai_error,
    metric,
    random_vector,
    upload,
)

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]  # the session server

API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def post_chat(server: ServerProcess, **fields: Any) -> httpx.Response:
    body = {"model": LLAMA, "messages": QUESTION, "max_tokens": 4, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=API, timeout=30)


@pytest.fixture
def store_unchanged(server: ServerProcess, personas: Any) -> Iterator[None]:
    """Asserts after the test that the stored personas are exactly as before it."""

    def snapshot() -> tuple[Any, Any]:
        listing = httpx.get(f"{server.url}/admin/personas", headers=ADMIN).json()["data"]
        pirate = httpx.get(
            f"{server.url}/admin/personas/pirate", params={"model": LLAMA}, headers=ADMIN
        ).json()
        return listing, pirate

    before = snapshot()
    yield
    assert snapshot() == before


def test_unknown_model_is_404(server: ServerProcess) -> None:
    error = assert_openai_error(post_chat(server, model="no-such-model"), 404, "no-such-model")
    assert error["code"] == "model_not_found"


def test_unknown_persona_is_404_naming_persona_and_model(server: ServerProcess, personas: Any) -> None:
    assert_openai_error(post_chat(server, persona="ghost"), 404, "'ghost'", f"'{LLAMA}'")


@pytest.mark.parametrize("name", ["bad name", "-leading-dash", "x" * 65, "semi;colon"])
def test_bad_persona_name_in_a_request_is_422(server: ServerProcess, name: str) -> None:
    assert_openai_error(post_chat(server, persona=name), 422, "persona")


def test_strength_above_the_cap_is_400(server: ServerProcess, personas: Any) -> None:
    assert_openai_error(post_chat(server, persona="pirate", persona_strength=51), 400, "strength 51")
    assert_openai_error(post_chat(server, persona=[{"name": "pirate", "strength": -60}]), 400, "-60")


def test_max_tokens_above_the_cap_is_400(server: ServerProcess) -> None:
    assert_openai_error(post_chat(server, max_tokens=901), 400, "901", "900")


def test_prompt_over_the_context_is_400(server: ServerProcess) -> None:
    long = [{"role": "user", "content": "storm " * 1200}]
    assert_openai_error(post_chat(server, messages=long), 400, "maximum context length is 1024")


def test_layer_override_outside_the_persona_is_422(server: ServerProcess, personas: Any) -> None:
    assert_openai_error(post_chat(server, persona="pirate", steering={"layers": [2]}), 422, "layers [2]")


def test_wrong_or_missing_api_key_is_401(server: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert assert_openai_error(response, 401)["type"] == "authentication_error"


def test_body_over_the_cap_is_413(server: ServerProcess, store_unchanged: None) -> None:
    huge = {"model": LLAMA, "layers": {"1": [0.5] * 60_000}}
    response = httpx.put(f"{server.url}/admin/personas/pirate", json=huge, headers=ADMIN)
    assert_openai_error(response, 413, "200000")


def test_bodies_over_the_cap_are_counted(server: ServerProcess, store_unchanged: None) -> None:
    def refused() -> float:
        return metric(server.url, "persona_server_requests_refused_total", status="413")

    before = refused()
    huge = {"model": LLAMA, "layers": {"1": [0.5] * 60_000}}
    assert_openai_error(httpx.put(f"{server.url}/admin/personas/pirate", json=huge, headers=ADMIN), 413)
    chunks = iter([json.dumps(huge).encode()])  # no Content-Length: counted as it arrives
    response = httpx.put(
        f"{server.url}/admin/personas/pirate",
        content=chunks,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert_openai_error(response, 413)
    assert refused() == before + 2


def test_chunked_body_over_the_cap_is_413(server: ServerProcess, store_unchanged: None) -> None:
    payload = json.dumps({"model": LLAMA, "layers": {"1": [0.5] * 60_000}}).encode()
    chunks = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
    response = httpx.put(
        f"{server.url}/admin/personas/pirate",
        content=chunks,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert_openai_error(response, 413)


@pytest.mark.parametrize(
    ("layers", "status", "fragments"),
    [
        ({"1": random_vector(63, 0)}, 422, ("63", "64")),
        ({"3": random_vector(64, 0)}, 422, ("layer 3", "0..2")),
        ({"-1": random_vector(64, 0)}, 422, ()),
        ({"one": random_vector(64, 0)}, 422, ()),
        ({}, 422, ()),
        ({"1": [1e39] * 64}, 422, ("not finite",)),
    ],
)
def test_bad_vectors_are_422(
    server: ServerProcess,
    store_unchanged: None,
    layers: dict[str, Any],
    status: int,
    fragments: tuple[str, ...],
) -> None:
    response = httpx.put(
        f"{server.url}/admin/personas/pirate", json={"model": LLAMA, "layers": layers}, headers=ADMIN
    )
    assert_openai_error(response, status, *fragments)


def test_a_vector_that_overflows_at_the_largest_strength_is_422(
    server: ServerProcess, store_unchanged: None
) -> None:
    # Finite in float32, but 50 (the server's largest strength) times it is not.
    response = upload(server.url, "pirate", LLAMA, {1: [1e37] * 64})
    error = assert_openai_error(response, 422, "layer 1", "overflow", "50")
    assert error["param"] == "layers.1"
    fits = upload(server.url, "loud", LLAMA, {1: [6e36] * 64})  # 3e38 at strength 50: still finite
    assert fits.status_code == 200, fits.text
    httpx.delete(f"{server.url}/admin/personas/loud", params={"model": LLAMA}, headers=ADMIN)


@pytest.mark.parametrize(
    "body",
    [b'{"model": "tiny-llama", "messages": [', b'{"model": "tiny-\xff-llama"}'],
    ids=["truncated-json", "not-utf-8"],
)
def test_a_body_that_is_not_json_is_400(server: ServerProcess, body: bytes) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, headers={**API, "Content-Type": "application/json"}
    )
    error = assert_openai_error(response, 400, "the request body is not valid JSON")
    assert (error["code"], error["param"]) == ("invalid_json", None)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinite_values_are_422(server: ServerProcess, store_unchanged: None, token: str) -> None:
    values = ", ".join(["0.5"] * 63 + [token])
    body = f'{{"model": "{LLAMA}", "layers": {{"1": [{values}]}}}}'
    response = httpx.put(
        f"{server.url}/admin/personas/pirate",
        content=body,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert_openai_error(response, 422, "finite")


def test_bad_persona_name_on_upload_is_422(server: ServerProcess, store_unchanged: None) -> None:
    response = upload(server.url, "bad.name!", LLAMA, {1: random_vector(64, 0)})
    assert_openai_error(response, 422)


def test_default_strength_above_the_cap_is_400(server: ServerProcess, store_unchanged: None) -> None:
    assert_openai_error(upload(server.url, "pirate", LLAMA, {1: random_vector(64, 0)}, 99.0), 400, "99")


def test_upload_for_an_unknown_model_is_404(server: ServerProcess, store_unchanged: None) -> None:
    assert_openai_error(upload(server.url, "pirate", "no-such-model", {1: random_vector(64, 0)}), 404)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_admin_without_the_admin_key_is_401(
    server: ServerProcess, store_unchanged: None, key: str | None
) -> None:
    response = upload(server.url, "pirate", LLAMA, {1: random_vector(64, 9)}, admin_key=key)
    assert_openai_error(response, 401)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deleted = httpx.delete(f"{server.url}/admin/personas/pirate", params={"model": LLAMA}, headers=headers)
    assert_openai_error(deleted, 401)
    # The API key is not an admin key.
    assert_openai_error(httpx.get(f"{server.url}/admin/personas", headers=API), 401)


def test_stale_if_match_is_409(server: ServerProcess, store_unchanged: None, personas: Any) -> None:
    stale = str(personas["pirate"]["version"] - 1)
    response = httpx.put(
        f"{server.url}/admin/personas/pirate",
        json={"model": LLAMA, "layers": {"1": random_vector(64, 9)}},
        headers={**ADMIN, "If-Match": stale},
    )
    # If-Match: 0 means "only if it does not exist" (the store's ABSENT), written as "expected none".
    assert_openai_error(response, 409, "expected none" if stale == "0" else f"expected {stale}")


def test_upload_replace_and_delete_cycle(server: ServerProcess) -> None:
    first = upload(server.url, "short-lived", LLAMA, {2: random_vector(64, 7)}, 2.0).json()
    second = upload(server.url, "short-lived", LLAMA, {2: random_vector(64, 8)}, 2.0).json()
    assert second["version"] == first["version"] + 1 and second["checksum"] != first["checksum"]
    stored = httpx.get(
        f"{server.url}/admin/personas/short-lived", params={"model": LLAMA}, headers=ADMIN
    ).json()
    assert stored["layers"]["2"] == pytest.approx(random_vector(64, 8), rel=1e-6)
    deleted = httpx.delete(f"{server.url}/admin/personas/short-lived", params={"model": LLAMA}, headers=ADMIN)
    assert deleted.status_code == 204
    gone = httpx.get(f"{server.url}/admin/personas/short-lived", params={"model": LLAMA}, headers=ADMIN)
    assert_openai_error(gone, 404, "short-lived")


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 129},
        {"best_of": 3},
        {"top_logprobs": 2},
        {"response_format": {"type": "json_object"}},
        {"stop_token_ids": [10**6]},
        {"persona_monitor": ["pirate"], "n": 2},
        {"temperature": -0.5},
        {"top_p": 0},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"persona_strength": 2.0},
        {"steering": {"layers": [0]}},
        {"persona": "pirate", "steering": {"positions": "everywhere"}},
        {"persona": [{"name": "pirate"}], "persona_strength": 2},
        {"max_tokens": 0},
        {"seed": 2**70},
    ],
)
def test_malformed_requests_are_4xx(server: ServerProcess, personas: Any, fields: dict[str, Any]) -> None:
    response = post_chat(server, **fields)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_text_with_a_lone_surrogate_is_422(server: ServerProcess) -> None:
    message = '{"role": "user", "content": "bad \\ud800 text"}'
    body = f'{{"model": "tiny-llama", "max_tokens": 2, "messages": [{message}]}}'
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, headers={**API, "Content-Type": "application/json"}
    )
    assert_openai_error(response, 422, "lone surrogate")


def test_lone_surrogates_never_reach_the_store(server: ServerProcess, store_unchanged: None) -> None:
    vector = ", ".join(["0.5"] * 64)
    body = f'{{"model": "{LLAMA}", "layers": {{"1": [{vector}]}}, "description": "x \\udc00"}}'
    response = httpx.put(
        f"{server.url}/admin/personas/pirate",
        content=body,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert_openai_error(response, 422, "description")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/admin/personas/pirate", "DELETE, GET, PUT"),
        ("PUT", "/admin/jobs/job-0", "DELETE, GET"),
        ("POST", "/admin/mappings/map-000000000000", "DELETE, GET"),
        ("PUT", "/admin/mappings", "GET, POST"),
        ("OPTIONS", "/admin/personas/pirate", "DELETE, GET, PUT"),
        ("GET", "/v1/chat/completions", "POST"),
    ],
)
def test_a_405_lists_every_method_of_the_path(
    server: ServerProcess, method: str, path: str, allowed: str
) -> None:
    # RFC 9110: Allow lists the resource's methods, not only those of the first route on the path.
    response = httpx.request(method, f"{server.url}{path}", headers=ADMIN)
    assert_openai_error(response, 405)
    assert response.headers["allow"] == allowed


IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
GHOST_RULE = {"monitor": "ghost", "above": 0.5, "steer": {"name": "pirate"}}


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "storm " * 1200}]}, 400, "messages"),
        ({"persona": "ghost"}, 404, "persona"),
        ({"persona": [{"name": "pirate", "strength": 1}, {"name": "ghost"}]}, 404, "persona"),
        ({"persona_monitor": ["pirate", "ghost"]}, 404, "persona_monitor"),
        ({"persona_target": {"name": "ghost", "score": 1.0}}, 404, "persona_target"),
        ({"persona_when": [GHOST_RULE]}, 404, "persona_when"),
        ({"persona": "pirate", "steering": {"layers": [2]}}, 422, "steering.layers"),
        ({"messages": [{"role": "user", "content": [IMAGE_PART]}]}, 422, "messages.0.content"),
        ({"persona": [{"name": 7}]}, 422, "persona.0.name"),
        ({"stop": [7]}, 422, "stop.0"),
    ],
    ids=[
        "context",
        "persona",
        "composed-persona",
        "monitor",
        "target",
        "rule",
        "steering-layer",
        "image-part",
        "union-member",
        "stop-member",
    ],
)
def test_a_chat_4xx_names_the_field_at_fault(
    server: ServerProcess, personas: Any, fields: dict[str, Any], status: int, param: str
) -> None:
    error = assert_openai_error(post_chat(server, **fields), status)
    assert error["param"] == param, error
    assert "list[" not in error["message"] and "function-after" not in error["message"], error


@pytest.mark.parametrize(
    ("prompt", "status", "param"),
    [
        ("storm " * 1200, 400, "prompt"),
        ("", 422, "prompt"),
        (["a", ""], 422, "prompt.1"),
        ([], 422, "prompt"),
    ],
    ids=["context", "empty", "empty-member", "empty-list"],
)
def test_a_completion_4xx_names_the_prompt(
    server: ServerProcess, prompt: Any, status: int, param: str
) -> None:
    body = {"model": LLAMA, "prompt": prompt, "max_tokens": 4}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=API, timeout=30)
    assert assert_openai_error(response, status)["param"] == param


# A JSON value of another type than the schema's: pydantic's lax mode took each of these (a bake with
# "seed": false ran with seed 0). Bodies that would start a job or a generation name an unknown
# persona or model, so that a server that takes the value answers 404 and starts nothing.
NO_CHAT = {"model": "no-such-model", "messages": QUESTION}
WRONG_TYPES = [
    ("/admin/personas/ghost/bake", {"model": LLAMA, "seed": False}, "seed"),
    ("/admin/personas/ghost/bake", {"model": LLAMA, "rank": True}, "rank"),
    ("/admin/personas/ghost/bake", {"model": LLAMA, "steps": "300"}, "steps"),
    ("/admin/personas/ghost/bake", {"model": LLAMA, "strength": True}, "strength"),
    ("/admin/personas/ghost/extract", {"seed": False}, "seed"),
    ("/admin/personas/ghost/extract", {"samples_per_question": True}, "samples_per_question"),
    ("/admin/personas/ghost/extract", {"temperature": "1.0"}, "temperature"),
    ("/admin/personas/ghost/extract", {"layers": [True]}, "layers.0"),
    ("/v1/chat/completions", {**NO_CHAT, "n": True}, "n"),
    ("/v1/chat/completions", {**NO_CHAT, "max_tokens": "4"}, "max_tokens"),
    ("/v1/chat/completions", {**NO_CHAT, "temperature": True}, "temperature"),
    ("/v1/chat/completions", {**NO_CHAT, "stream": 1}, "stream"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi", "echo": "yes"}, "echo"),
]
EXTRACTION = {
    "model": "no-such-model",
    "positive_prompts": ["be a pirate"],
    "negative_prompts": ["be plain"],
    "questions": ["tell me about the sea"],
}


@pytest.mark.parametrize(
    ("path", "fields", "param"), WRONG_TYPES, ids=[f"{p}-{r}" for p, _, r in WRONG_TYPES]
)
def test_a_value_of_another_json_type_is_422(
    server: ServerProcess, path: str, fields: dict[str, Any], param: str
) -> None:
    body = {**EXTRACTION, **fields} if path.endswith("/extract") else fields
    headers = API if path.startswith("/v1/") else ADMIN
    response = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)
    assert assert_openai_error(response, 422)["param"] == param


def test_an_integer_written_as_a_whole_number_is_taken(server: ServerProcess) -> None:
    # JSON Schema counts 4.0 as an integer, and so does the server.
    response = post_chat(server, n=1.0, max_tokens=4.0, seed=7.0)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("if_match", ["null", "*", 'W/"1"', '"1", "2"', '"1', "1.0", "-1"])
def test_an_if_match_that_is_not_one_version_is_400_naming_the_header(
    server: ServerProcess, store_unchanged: None, personas: Any, if_match: str
) -> None:
    headers = {**ADMIN, "If-Match": if_match}
    for method, path, body in [
        ("PUT", "/admin/personas/pirate", {"model": LLAMA, "layers": {"1": random_vector(64, 9)}}),
        ("DELETE", f"/admin/personas/pirate?model={LLAMA}", None),
        ("POST", "/admin/personas/pirate/restore", {"model": LLAMA, "version": 1}),
    ]:
        response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
        error = assert_openai_error(response, 400, "If-Match")
        assert error["param"] == "If-Match", (method, error)


def test_if_match_takes_the_version_as_an_entity_tag_or_a_number(server: ServerProcess) -> None:
    version = upload(server.url, "tagged", LLAMA, {1: random_vector(64, 3)}).json()["version"]
    body = {"model": LLAMA, "layers": {"1": random_vector(64, 4)}}
    tagged = httpx.put(
        f"{server.url}/admin/personas/tagged", json=body, headers={**ADMIN, "If-Match": f'"{version}"'}
    )
    assert tagged.status_code == 200, tagged.text
    bare = httpx.delete(
        f"{server.url}/admin/personas/tagged",
        params={"model": LLAMA},
        headers={**ADMIN, "If-Match": str(version + 1)},
    )
    assert bare.status_code == 204, bare.text


def test_an_extraction_whose_questions_cannot_fit_the_context_is_400_at_once(server: ServerProcess) -> None:
    # The tiny Llama's context is 1024 tokens; this system prompt and question together are more.
    long = "storm " * 660
    body = {
        **EXTRACTION,
        "model": LLAMA,
        "positive_prompts": ["be a pirate", long],
        "questions": ["sea?", long],
    }
    url = f"{server.url}/admin/personas/longwinded/extract"
    error = assert_openai_error(
        httpx.post(url, json=body, headers=ADMIN, timeout=60), 400, "question 1", "1024"
    )
    assert error["param"] == "questions"
