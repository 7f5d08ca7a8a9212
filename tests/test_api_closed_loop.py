"""Closed-loop steering through the official openai client: per-token scores, a target, rules.

The server is the session's (tiny Llama and Qwen on the HF engine, the tiny Llama's very weights on
llama.cpp, whose per-row lane serves closed loops); its personas are random vectors, so these tests
check what the fields do, not what a trait looks like (the demo models' table in the README
measures that: `persona-server eval --closed-loop`).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from testkit.server_process import ServerProcess
from tests.api_helpers import API_KEY, GGUF, LLAMA, QUESTION, assert_openai_error, chat, random_vector, upload

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]  # the session server

TOKENS = 12


def ask(client: openai.OpenAI, stream: bool = False, model: str = LLAMA, **extra: Any) -> Any:
    return chat(client, model, max_tokens=TOKENS, stream=stream, **extra)


def streamed(client: openai.OpenAI, model: str = LLAMA, **extra: Any) -> tuple[str, list[dict[str, Any]]]:
    """The streamed answer's text and each chunk's persona-server fields."""
    text, extras = "", []
    for chunk in ask(client, stream=True, model=model, **extra):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            extras.append(chunk.model_extra)
    return text, extras


def joined(extras: list[dict[str, Any]], field: str) -> list[Any]:
    return [value for chunk in extras for value in chunk.get(field) or []]


def test_token_scores_come_with_every_token_streamed_or_not(
    client: openai.OpenAI, personas: dict[str, Any]
) -> None:
    fields = {"persona_monitor": ["pirate", "formal"], "persona_monitor_tokens": True}
    whole = ask(client, **fields)
    scores = whole.model_extra["persona_token_scores"]
    assert set(scores) == {"pirate", "formal"}
    assert all(len(values) == TOKENS for values in scores.values())
    assert set(whole.model_extra["persona_scores"]) == {"pirate", "formal"}  # the answer-level scores too
    assert (
        whole.choices[0].message.content == ask(client).choices[0].message.content
    )  # reading changes nothing
    text, extras = streamed(client, **fields)
    assert text == whole.choices[0].message.content
    per_chunk = {
        name: [v for chunk in extras for v in chunk["persona_token_scores"][name]] for name in scores
    }
    assert per_chunk["pirate"] == pytest.approx(scores["pirate"], abs=1e-5)
    plain = ask(client, persona_monitor=["pirate"])
    assert "persona_token_scores" not in plain.model_extra  # opt-in


def test_a_target_sets_the_strength_token_by_token_within_its_bound(
    client: openai.OpenAI, personas: dict[str, Any]
) -> None:
    default = personas["pirate"]["default_strength"]
    for score, direction in ((1000.0, 1), (-1000.0, -1)):
        target = {"name": "pirate", "score": score, "max_strength": 10.0}
        whole = ask(client, persona_target=target)
        strengths = whole.model_extra["persona_target_strengths"]
        assert len(strengths) == TOKENS and strengths[0] == default  # the prompt runs at the default
        assert direction * (strengths[-1] - strengths[0]) > 0
        assert all(abs(s) <= 10.0 for s in strengths)
        echo = whole.model_extra["persona"]
        assert echo["name"] == "pirate" and echo["target_score"] == score
        assert echo["strength"] == pytest.approx(sum(strengths) / TOKENS)
    rising = {"name": "pirate", "score": 1000.0, "max_strength": 10.0}
    whole = ask(client, persona_target=rising)
    text, extras = streamed(client, persona_target=rising)
    assert text == whole.choices[0].message.content
    assert joined(extras, "persona_target_strengths") == pytest.approx(
        whole.model_extra["persona_target_strengths"]
    )
    # Every chunk names the persona at its first strength; the last one at the answer's mean.
    assert extras[0]["persona"]["strength"] == default
    assert extras[-1]["persona"]["strength"] == pytest.approx(whole.model_extra["persona"]["strength"])


def test_a_rule_that_never_fires_changes_nothing_and_one_that_fires_reports_when(
    client: openai.OpenAI, personas: dict[str, Any]
) -> None:
    plain = ask(client).choices[0].message.content
    never = {"monitor": "formal", "above": 1e9, "steer": {"name": "quitter", "strength": 40.0}}
    quiet = ask(client, persona_when=[never])
    assert quiet.choices[0].message.content == plain
    assert quiet.model_extra["persona_when_fired"] == []
    always = {
        "monitor": "formal",
        "above": -1e9,
        "steer": {"name": "quitter", "strength": 40.0},
        "for_tokens": 3,
    }
    fired = ask(client, persona_when=[never, always])
    # Read at the prompt's last token, it fires there and steers every token (the reading stays past).
    assert fired.model_extra["persona_when_fired"] == [{"rule": 1, "token": 0, "tokens": TOKENS}]
    assert fired.choices[0].message.content != plain
    text, extras = streamed(client, persona_when=[never, always])
    assert text == fired.choices[0].message.content
    assert extras[-1]["persona_when_fired"] == [{"rule": 1, "token": 0, "tokens": TOKENS}]
    assert all("persona_when_fired" not in chunk for chunk in extras[:-1])


def test_the_gguf_twin_reads_and_steers_like_the_hf_model(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    """The same weights on llama.cpp (its per-row lane) and on transformers: the same answers, readings,
    strengths and rules."""
    for model in (LLAMA, GGUF):
        for name, layers in (
            ("loop-trait", {1: random_vector(64, 61), 2: random_vector(64, 62)}),
            ("loop-push", {1: random_vector(64, 63)}),
        ):
            assert upload(server.url, name, model, layers, 4.0).status_code == 200
    fields = {
        "persona_monitor": ["loop-trait"],
        "persona_monitor_tokens": True,
        "persona_target": {"name": "loop-trait", "score": 50.0, "max_strength": 8.0},
        "persona_when": [
            {
                "monitor": "loop-trait",
                "above": -1e9,
                "for_tokens": 2,
                "steer": {"name": "loop-push", "strength": 12.0},
            }
        ],
    }
    hf, gguf = ask(client, **fields), ask(client, model=GGUF, **fields)
    assert gguf.choices[0].message.content == hf.choices[0].message.content
    assert gguf.model_extra["persona_when_fired"] == hf.model_extra["persona_when_fired"]
    assert hf.model_extra["persona_when_fired"][0] == {"rule": 0, "token": 0, "tokens": TOKENS}
    for field in ("persona_target_strengths",):
        assert gguf.model_extra[field] == pytest.approx(hf.model_extra[field], rel=1e-3, abs=1e-3)
    readings = [body.model_extra["persona_token_scores"]["loop-trait"] for body in (hf, gguf)]
    assert readings[1] == pytest.approx(readings[0], rel=1e-3, abs=1e-3)
    text, extras = streamed(client, model=GGUF, **fields)
    assert text == gguf.choices[0].message.content
    assert joined(extras, "persona_target_strengths") == pytest.approx(
        gguf.model_extra["persona_target_strengths"]
    )


def _post(server: ServerProcess, **fields: Any) -> httpx.Response:
    body = {"model": LLAMA, "messages": QUESTION, "max_tokens": 4, **fields}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_closed_loop_requests_it_cannot_serve_get_clear_errors(
    server: ServerProcess, personas: dict[str, Any]
) -> None:
    target = {"name": "pirate", "score": 1.0}
    rule = {"monitor": "formal", "above": 1.0, "steer": {"name": "quitter"}}
    assert assert_openai_error(_post(server, persona_when=[rule], n=2), 400, "n > 1")["param"] == "n"
    error = assert_openai_error(_post(server, persona_monitor_tokens=True), 400, "needs persona_monitor")
    assert error["param"] == "persona_monitor_tokens"
    assert_openai_error(_post(server, persona="pirate", persona_target=target), 400, "both in persona")
    assert_openai_error(_post(server, persona_target={**target, "max_strength": 500}), 400, "limit")
    assert_openai_error(_post(server, persona_target={**target, "name": "ghost"}), 404, "ghost")
    assert_openai_error(_post(server, persona_when=[{**rule, "monitor": "ghost"}]), 404, "ghost")
    assert_openai_error(_post(server, persona_when=[{**rule, "below": 0.0}]), 422, "exactly one")
    assert_openai_error(_post(server, persona_when=[{**rule, "for_tokens": 0}]), 422)
    assert_openai_error(_post(server, persona_target={**target, "gain": 0}), 422)
    assert _post(server, persona_target=target).status_code == 200  # the server went on
