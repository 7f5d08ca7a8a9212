"""A GGUF model served through the OpenAI API answers like its HF checkpoint, persona and all."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from testkit.server_process import ServerProcess
from tests.api_helpers import GGUF, LLAMA, assert_openai_error, chat, random_vector, upload

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]  # the session server


def ask(client: openai.OpenAI, model: str, **extra: Any) -> str:
    return chat(client, model, max_tokens=14, **extra).choices[0].message.content or ""


def test_same_weights_same_persona_same_answer(server: ServerProcess, client: openai.OpenAI) -> None:
    layers = {1: random_vector(64, 31), 2: random_vector(64, 32)}
    for model in (LLAMA, GGUF):
        assert upload(server.url, "twin", model, layers, 5.0).status_code == 200
    plain = ask(client, GGUF)
    assert plain == ask(client, LLAMA)
    steered = ask(client, GGUF, persona="twin")
    assert steered == ask(client, LLAMA, persona="twin") and steered != plain
    prompt_only = {"persona": "twin", "steering": {"positions": "prompt"}}
    assert ask(client, GGUF, **prompt_only) == ask(client, LLAMA, **prompt_only)

    stream = chat(
        client, GGUF, max_tokens=14, stream=True, stream_options={"include_usage": True}, persona="twin"
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == steered
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 14


def test_block_0_of_a_gguf_model_is_refused_with_the_reason(server: ServerProcess) -> None:
    refused = upload(server.url, "low-gguf", GGUF, {0: random_vector(64, 1), 1: random_vector(64, 2)})
    assert_openai_error(refused, 422, "llama.cpp control vectors cannot steer block 0")


def test_monitoring_on_a_gguf_model_scores_like_its_hf_twin(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    layers = {1: random_vector(64, 51), 2: random_vector(64, 52)}
    for model in (LLAMA, GGUF):
        assert upload(server.url, "watched", model, layers, 3.0).status_code == 200
    scores = [
        chat(client, model, persona="watched", persona_monitor=["watched"]).model_extra["persona_scores"][
            "watched"
        ]
        for model in (LLAMA, GGUF)
    ]
    assert scores[0] == pytest.approx(scores[1], rel=1e-3, abs=1e-4)
