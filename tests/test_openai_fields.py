"""The OpenAI sampling fields through the official client, on the HF engine and on llama.cpp (the same
weights), and the same answers from both; vLLM's turn is in test_api_vllm.py."""

from __future__ import annotations

import openai
import pytest

from testkit.server_process import ServerProcess
from tests import openai_field_checks as checks
from tests.api_helpers import GGUF, LLAMA, random_vector, upload

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]  # the session server

ENGINES = {LLAMA: "hf", GGUF: "llamacpp"}


@pytest.fixture(scope="module")
def persona(server: ServerProcess) -> str:
    layers = {1: random_vector(64, 41), 2: random_vector(64, 42)}
    for model in ENGINES:
        assert upload(server.url, "fields", model, layers, 6.0).status_code == 200
    return "fields"


@pytest.mark.parametrize("model", list(ENGINES))
def test_logprobs(client: openai.OpenAI, persona: str, model: str) -> None:
    checks.check_chat_logprobs(client, model, persona)
    checks.check_text_logprobs(client, model)


def test_logprobs_are_the_same_on_both_engines(client: openai.OpenAI, persona: str) -> None:
    hf, gguf = (checks.check_chat_logprobs(client, model, persona) for model in ENGINES)
    assert [e.token for e in gguf] == [e.token for e in hf]
    assert [e.logprob for e in gguf] == pytest.approx([e.logprob for e in hf], abs=1e-3)


@pytest.mark.parametrize("model", list(ENGINES))
def test_n_answers_and_seeds(client: openai.OpenAI, model: str) -> None:
    checks.check_n_answers(client, model)
    checks.check_seed_in_a_batch(client, model)


@pytest.mark.parametrize("model", list(ENGINES))
def test_penalties_and_truncations(client: openai.OpenAI, model: str) -> None:
    checks.check_penalties(client, model)
    checks.check_truncations(client, model)


def test_penalized_greedy_answers_are_the_same_on_both_engines(client: openai.OpenAI) -> None:
    hf, gguf = (checks.chat(client, model, **checks.PENALIZED) for model in ENGINES)
    plain = checks.chat(client, LLAMA, max_tokens=16).choices[0].message.content
    assert gguf.choices[0].message.content == hf.choices[0].message.content != plain


@pytest.mark.parametrize("model", list(ENGINES))
def test_stop_ids_min_tokens_prompts_and_echo(client: openai.OpenAI, model: str) -> None:
    checks.check_stop_ids_and_min_tokens(client, model)
    checks.check_prompts_and_echo(client, model)


@pytest.mark.parametrize("model", list(ENGINES))
def test_what_an_engine_cannot_do_is_a_400_naming_the_field(
    client: openai.OpenAI, persona: str, model: str
) -> None:
    checks.check_unsupported_combinations(client, model, persona)
    checks.check_json_refused(client, model, ENGINES[model])
