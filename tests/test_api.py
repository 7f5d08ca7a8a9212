"""The OpenAI-compatible API over a real uvicorn process, driven by the official openai client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from testkit.server_process import ServerProcess
from tests import api_helpers
from tests.api_helpers import API_KEY, GGUF, LLAMA, QUESTION, QWEN, metric, random_vector, upload, wait_until

# The session server (it serves a GGUF model too).
pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]


def chat(client: openai.OpenAI, model: str = LLAMA, max_tokens: int = 12, **extra: Any) -> Any:
    return api_helpers.chat(client, model, max_tokens=max_tokens, **extra)


def test_models_are_listed_with_their_shapes(client: openai.OpenAI) -> None:
    cards = {model.id: model for model in client.models.list().data}
    assert set(cards) == {LLAMA, QWEN, GGUF}
    assert (cards[GGUF].model_extra["num_layers"], cards[GGUF].model_extra["hidden_size"]) == (3, 64)
    assert (cards[LLAMA].model_extra["backend"], cards[GGUF].model_extra["backend"]) == ("hf", "llamacpp")
    assert (cards[LLAMA].model_extra["num_layers"], cards[LLAMA].model_extra["hidden_size"]) == (3, 64)
    assert (cards[QWEN].model_extra["num_layers"], cards[QWEN].model_extra["hidden_size"]) == (3, 48)
    assert client.models.retrieve(QWEN).owned_by == "persona-server"


def test_persona_steers_and_is_echoed(
    client: openai.OpenAI, personas: dict[str, Any], llama_dir: Path
) -> None:
    plain = chat(client)
    steered = chat(client, persona="pirate")
    zero = chat(client, persona="pirate", persona_strength=0)
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert zero.choices[0].message.content == plain.choices[0].message.content
    assert plain.model_extra["persona"] is None
    assert steered.model_extra["persona"] == {
        "name": "pirate",
        "strength": 6.0,
        "version": personas["pirate"]["version"],
        "layers": [1],
    }
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prompt_tokens = len(
        tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)["input_ids"]
    )
    assert steered.usage.prompt_tokens == prompt_tokens
    assert steered.usage.completion_tokens == 12 and steered.choices[0].finish_reason == "length"
    assert steered.usage.total_tokens == prompt_tokens + 12


def test_strength_and_layer_overrides(client: openai.OpenAI, personas: dict[str, Any]) -> None:
    default = chat(client, persona="formal")
    doubled = chat(client, persona="formal", persona_strength=6.0)
    one_layer = chat(client, persona="formal", steering={"layers": [2], "positions": "response"})
    assert default.model_extra["persona"]["strength"] == 3.0
    assert doubled.model_extra["persona"]["strength"] == 6.0
    assert one_layer.model_extra["persona"]["layers"] == [2]
    texts = {r.choices[0].message.content for r in (default, doubled, one_layer)}
    assert len(texts) == 3


def test_streaming_with_usage_matches_the_plain_answer(
    client: openai.OpenAI, personas: dict[str, Any]
) -> None:
    whole = chat(client, persona="pirate", max_tokens=20)
    stream = chat(
        client, max_tokens=20, stream=True, stream_options={"include_usage": True}, persona="pirate"
    )
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[0].model_extra["persona"]["name"] == "pirate"


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    def sampled(seed: int) -> str:
        return chat(client, max_tokens=16, temperature=0.9, seed=seed).choices[0].message.content or ""

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


@pytest.mark.parametrize("model", [LLAMA, GGUF], ids=["hf", "llama.cpp"])
async def test_concurrent_personas_equal_their_solo_answers(server: ServerProcess, model: str) -> None:
    """Six requests, each with another persona, strength, composition or positions (or none), asked
    twice over at once answer what each answers alone. (The vLLM engine: tests/test_vllm_engine.py.)"""
    for index, name in enumerate(("together-a", "together-b", "together-c")):
        layers = {1 + index % 2: random_vector(64, 40 + index)}  # llama.cpp cannot steer block 0
        assert upload(server.url, name, model, layers, 4.0).status_code == 200
    variants: list[dict[str, Any]] = [
        {},
        {"persona": "together-a"},
        {"persona": "together-b", "steering": {"positions": "prompt"}},
        {"persona": "together-c"},
        {"persona": "together-a", "persona_strength": -3},
        {"persona": [{"name": "together-a", "strength": 2}, {"name": "together-b", "strength": -1}]},
    ]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

    async def ask(extra: dict[str, Any]) -> str:
        response = await chat(client, model, **extra)  # type: ignore[arg-type]
        return response.choices[0].message.content or ""

    solo = [await ask(extra) for extra in variants]
    together = await asyncio.gather(*(ask(extra) for extra in variants * 2))
    await client.close()
    assert together == solo * 2
    assert len(set(solo)) >= 4  # they steer (a random model may garble two alike)


def test_composition_echoes_each_persona(client: openai.OpenAI, personas: dict[str, Any]) -> None:
    response = chat(client, persona=[{"name": "pirate", "strength": 2}, {"name": "formal"}])
    echoes = response.model_extra["persona"]
    assert [(e["name"], e["strength"], e["layers"]) for e in echoes] == [
        ("pirate", 2, [1]),
        ("formal", 3.0, [0, 2]),
    ]


def test_two_models_each_with_their_own_personas(client: openai.OpenAI, personas: dict[str, Any]) -> None:
    plain = chat(client, model=QWEN)
    calm = chat(client, model=QWEN, persona="calm")
    assert calm.model == QWEN and calm.model_extra["persona"]["name"] == "calm"
    assert calm.choices[0].message.content != plain.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="persona 'calm' does not exist for model 'tiny-llama'"):
        chat(client, model=LLAMA, persona="calm")


def test_text_completions_plain_and_streamed(client: openai.OpenAI, personas: dict[str, Any]) -> None:
    extra = {"persona": "pirate", "ignore_eos": True}
    whole = client.completions.create(
        model=LLAMA, prompt="The captain", max_tokens=10, temperature=0, extra_body=extra
    )
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 10
    streamed = client.completions.create(
        model=LLAMA, prompt="The captain", max_tokens=10, temperature=0, stream=True, extra_body=extra
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text


def test_personas_are_listed_without_vectors(server: ServerProcess, personas: dict[str, Any]) -> None:
    listing = httpx.get(
        f"{server.url}/v1/personas", params={"model": LLAMA}, headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()["data"]
    by_name = {item["name"]: item for item in listing}
    assert {"pirate", "formal", "quitter"} <= set(by_name) and "calm" not in by_name
    assert by_name["formal"]["layers"] == [0, 2] and by_name["formal"]["default_strength"] == 3.0
    assert by_name["formal"]["provenance"] == {"kind": "uploaded"}
    assert by_name["formal"]["description"] == "formal test persona"
    assert all(isinstance(layer, int) for item in listing for layer in item["layers"])


def test_metrics_count_requests_and_tokens(
    server: ServerProcess, client: openai.OpenAI, personas: Any
) -> None:
    labels = {"model": LLAMA, "persona": "formal", "status": "length"}
    before = metric(server.url, "persona_server_requests_total", **labels)
    tokens_before = metric(
        server.url, "persona_server_generation_tokens_total", model=LLAMA, persona="formal"
    )
    lookups_before = metric(server.url, "persona_server_store_cache_lookups_total", result="hit") + metric(
        server.url, "persona_server_store_cache_lookups_total", result="miss"
    )
    for _ in range(3):
        chat(client, persona="formal", max_tokens=5)
    lookups_after = metric(server.url, "persona_server_store_cache_lookups_total", result="hit") + metric(
        server.url, "persona_server_store_cache_lookups_total", result="miss"
    )
    assert lookups_after == lookups_before + 3  # one persona lookup per request
    assert metric(server.url, "persona_server_store_latency_seconds_count", operation="put") >= 1
    assert metric(server.url, "persona_server_requests_total", **labels) == before + 3
    tokens_after = metric(server.url, "persona_server_generation_tokens_total", model=LLAMA, persona="formal")
    assert tokens_after == tokens_before + 15
    ttft = metric(
        server.url, "persona_server_time_to_first_token_seconds_count", model=LLAMA, persona="formal"
    )
    assert ttft >= 3
    assert metric(server.url, "persona_server_requests_running", model=LLAMA) == 0


def test_a_client_leaving_a_stream_cancels_its_generation(server: ServerProcess, personas: Any) -> None:
    labels = {"model": LLAMA, "persona": "quitter"}
    body = {
        "model": LLAMA,
        "messages": QUESTION,
        "max_tokens": 900,
        "stream": True,
        "persona": "quitter",
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as response:
        events = (line for line in response.iter_lines() if line)
        for _ in range(3):
            assert next(events).startswith("data: {")

    def cancelled() -> float:
        return metric(server.url, "persona_server_requests_total", status="cancelled", **labels)

    wait_until(lambda: cancelled() == 1, 10, "the stream left was not counted as cancelled")
    assert metric(server.url, "persona_server_generation_tokens_total", **labels) < 900
    wait_until(
        lambda: metric(server.url, "persona_server_requests_running", model=LLAMA) == 0, 10, "it still runs"
    )


def test_a_client_leaving_a_plain_request_cancels_it(server: ServerProcess, personas: Any) -> None:
    labels = {"model": LLAMA, "persona": "quitter"}
    before = metric(server.url, "persona_server_requests_total", status="cancelled", **labels)
    body = {"model": LLAMA, "messages": QUESTION, "max_tokens": 900, "persona": "quitter", "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            timeout=0.5,
            headers={"Authorization": f"Bearer {API_KEY}"},
        )

    def cancelled() -> float:
        return metric(server.url, "persona_server_requests_total", status="cancelled", **labels)

    wait_until(lambda: cancelled() == before + 1, 10, "the request left was not counted as cancelled")
