"""No single request stalls the other clients, and the lists a request carries are bounded (issue 29,
item 5): /health answers within 1 s while a large non-streamed answer is built and sent; persona
compositions, stop strings and monitors have documented bounds; --max-strength bounds what a
composition adds at a block, not only each term."""

from __future__ import annotations

import httpx
import pytest

from server.serving.protocol.requests import MAX_COMPOSED_PERSONAS, MAX_STOP_STRINGS
from testkit.server_process import ServerProcess
from tests.api_helpers import API_KEY, LLAMA, QUESTION, HealthProbe, assert_openai_error

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]  # the session server

API = {"Authorization": f"Bearer {API_KEY}"}


def chat(server: ServerProcess, **fields: object) -> httpx.Response:
    body = {"model": LLAMA, "messages": QUESTION, "max_tokens": 4, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=API, timeout=300)


def test_a_huge_non_streamed_answer_leaves_health_answering(server: ServerProcess) -> None:
    """128 answers with 20 alternatives per token: the issue saw /health blocked 14 s by one such
    answer while it was built and encoded on the event loop."""
    with HealthProbe(server) as health:
        response = chat(server, n=128, max_tokens=48, logprobs=True, top_logprobs=20, ignore_eos=True)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 128 and all(len(c["logprobs"]["content"]) == 48 for c in choices)
    assert all(len(entry["top_logprobs"]) == 20 for entry in choices[0]["logprobs"]["content"])
    assert len(response.content) > 5_000_000
    assert health.answers > 0 and health.failures == 0, f"/health failed {health.failures} times"
    assert health.slowest <= 1.0, f"/health took {health.slowest:.2f} s"


def test_a_composition_beyond_the_bound_is_refused_naming_persona(
    server: ServerProcess, personas: dict
) -> None:
    terms = [{"name": "quitter", "strength": 0.1}] * (MAX_COMPOSED_PERSONAS + 1)
    error = assert_openai_error(chat(server, persona=terms), 422, f"at most {MAX_COMPOSED_PERSONAS} items")
    assert error["param"] == "persona"
    assert chat(server, persona=terms[:MAX_COMPOSED_PERSONAS]).status_code == 200


def test_max_strength_bounds_the_sum_of_a_composition_at_each_block(
    server: ServerProcess, personas: dict
) -> None:
    """The issue's 65 terms of strength 64 reached 4,160 at one block past --max-strength 64. This
    server's limit is 50: two terms of 30 on the same block add up to 60."""
    twice = [{"name": "pirate", "strength": 30}] * 2
    error = assert_openai_error(chat(server, persona=twice), 400, "add up to 60", "layer 1", "limit 50")
    assert error["param"] == "persona"
    # On different blocks they do not add: pirate steers block 1, formal blocks 0 and 2.
    apart = [{"name": "pirate", "strength": 30}, {"name": "formal", "strength": 30}]
    assert chat(server, persona=apart).status_code == 200
    assert chat(server, persona=[{"name": "pirate", "strength": 25}] * 2).status_code == 200


def test_stop_strings_are_bounded(server: ServerProcess) -> None:
    many = [f"stop{i}" for i in range(MAX_STOP_STRINGS + 1)]
    error = assert_openai_error(chat(server, stop=many), 422, f"at most {MAX_STOP_STRINGS} items")
    assert error["param"] == "stop"
    assert assert_openai_error(chat(server, stop="x" * 1025), 422, "1024 characters")["param"] == "stop"
    assert chat(server, stop=many[:MAX_STOP_STRINGS]).status_code == 200
