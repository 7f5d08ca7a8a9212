"""Request semantics of the serving layer: CompletionService on an in-process HF backend, no HTTP.

The service is built as the app's lifespan builds it (a model registry, a store, metrics, limits), so
these tests cover what a request means (personas, strengths, limits, streaming, echo, scores) in
milliseconds, while the API tests cover the HTTP protocol on a real server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from persona_store.errors import PersonaNotFound
from persona_store.records import PersonaDraft
from persona_store.sqlite import SQLiteStore
from server.engine.hf.backend import HFBackend
from server.metrics import Metrics
from server.serving.completions import CompletionService, Limits
from server.serving.errors import ModelNotFound, Overloaded, RequestRejected
from server.serving.model_registry import ModelRegistry
from server.serving.requests import ChatMessage, CompletionJob, PersonaTerm, SteeringOverride
from server.steering.errors import SteeringError
from server.testing.personas import random_vector

MODEL = "tiny-llama"  # the conftest's llama_backend serves under this id
LIMITS = Limits(max_tokens_cap=64, default_max_tokens=7, max_strength=20.0)
QUESTION = (ChatMessage("user", "tell me about the sea"),)
PERSONAS = {  # name -> (blocks, default strength); the tiny Llama has 3 blocks of 64
    "pirate": ((1,), 6.0),
    "formal": ((0, 2), 3.0),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path_factory.mktemp("serving") / "personas.sqlite3")

    async def seed() -> None:
        for seed, (name, (blocks, strength)) in enumerate(PERSONAS.items()):
            vectors = {block: np.array(random_vector(64, 10 * seed + block)) for block in blocks}
            await opened.put(PersonaDraft(MODEL, name, vectors, default_strength=strength))

    asyncio.run(seed())
    yield opened
    asyncio.run(opened.close())


def build_service(
    backend: HFBackend, store: SQLiteStore, max_in_flight: int = 8, metrics: Metrics | None = None
) -> CompletionService:
    registry = ModelRegistry({MODEL: backend}, max_in_flight=max_in_flight)
    return CompletionService(registry, store, metrics or Metrics(), LIMITS)


@pytest.fixture
def service(llama_backend: HFBackend, store: SQLiteStore) -> CompletionService:
    return build_service(llama_backend, store)


def job(**fields: Any) -> CompletionJob:
    """A greedy chat job that runs to max_tokens, so that answers compare token for token."""
    defaults: dict[str, Any] = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 12,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    return CompletionJob(**{**defaults, **fields})


def answer(body: dict[str, Any]) -> str:
    return body["choices"][0]["message"]["content"]


async def events(stream: AsyncIterator[str]) -> list[Any]:
    """The SSE events' payloads, decoded; the terminating ``[DONE]`` stays a string."""
    payloads = []
    async for event in stream:
        assert event.startswith("data: ") and event.endswith("\n\n"), event
        data = event.removeprefix("data: ").rstrip("\n")
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


async def test_a_persona_steers_and_strength_zero_equals_no_persona(service: CompletionService) -> None:
    plain = await service.complete(job())
    steered = await service.complete(job(persona="pirate"))
    zero = await service.complete(job(persona="pirate", persona_strength=0.0))
    assert answer(steered) != answer(plain)
    assert answer(zero) == answer(plain)
    assert plain["persona"] is None
    assert steered["persona"] == {"name": "pirate", "strength": 6.0, "version": 1, "layers": [1]}
    assert zero["persona"]["strength"] == 0.0


async def test_strength_scales_the_steering(service: CompletionService) -> None:
    default = await service.complete(job(persona="pirate"))
    explicit = await service.complete(job(persona="pirate", persona_strength=6.0))
    reversed_ = await service.complete(job(persona="pirate", persona_strength=-6.0))
    assert answer(explicit) == answer(default)  # the stored default strength is 6
    assert answer(reversed_) != answer(default)


async def test_a_list_of_personas_composes_and_echoes_each(service: CompletionService) -> None:
    both = await service.complete(job(persona=[PersonaTerm("pirate", 2.0), PersonaTerm("formal")]))
    assert both["persona"] == [
        {"name": "pirate", "strength": 2.0, "version": 1, "layers": [1]},
        {"name": "formal", "strength": 3.0, "version": 1, "layers": [0, 2]},
    ]
    alone = await service.complete(job(persona=[PersonaTerm("pirate", 2.0)]))
    single = await service.complete(job(persona="pirate", persona_strength=2.0))
    assert answer(alone) == answer(single) != answer(both)
    assert isinstance(alone["persona"], list) and isinstance(single["persona"], dict)


async def test_a_layer_override_steers_a_subset_of_the_personas_blocks(service: CompletionService) -> None:
    subset = await service.complete(job(persona="formal", steering=SteeringOverride(layers=(2,))))
    assert subset["persona"]["layers"] == [2]
    with pytest.raises(SteeringError, match=r"no vector for layers \[1\]"):
        await service.complete(job(persona="formal", steering=SteeringOverride(layers=(1,))))


async def test_bad_requests_raise_the_domain_error_naming_the_field(service: CompletionService) -> None:
    with pytest.raises(PersonaNotFound, match="ghost"):
        await service.complete(job(persona="ghost"))
    with pytest.raises(ModelNotFound, match="no-such-model"):
        await service.complete(job(model="no-such-model"))
    with pytest.raises(RequestRejected, match="at most 64") as capped:
        await service.complete(job(max_tokens=65))
    assert capped.value.param == "max_tokens"
    with pytest.raises(RequestRejected, match="outside") as strong:
        await service.complete(job(persona="pirate", persona_strength=20.5))
    assert strong.value.param == "persona_strength"
    with pytest.raises(RequestRejected, match="need a persona"):
        await service.complete(job(persona_strength=1.0))
    with pytest.raises(RequestRejected, match="single persona"):
        await service.complete(job(persona=[PersonaTerm("pirate")], persona_strength=1.0))
    with pytest.raises(PersonaNotFound, match="ghost"):
        await service.complete(job(persona_monitor=("ghost",)))


async def test_max_tokens_defaults_and_usage_counts(service: CompletionService) -> None:
    body = await service.complete(job(max_tokens=None))
    usage = body["usage"]
    assert usage["completion_tokens"] == LIMITS.default_max_tokens
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["finish_reason"] == "length"


async def test_a_text_completion_takes_a_prompt(service: CompletionService) -> None:
    body = await service.complete(job(messages=None, prompt="The sea is", persona="pirate"))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] and body["persona"]["name"] == "pirate"


async def test_a_stream_carries_the_same_answer_the_echo_and_usage(service: CompletionService) -> None:
    whole = await service.complete(job(persona="pirate"))
    payloads = await events(await service.stream(job(persona="pirate", stream=True, include_usage=True)))
    chunks, usage, done = payloads[:-2], payloads[-2], payloads[-1]
    assert done == "[DONE]"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["persona"] == whole["persona"] for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == answer(whole)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    without_usage = await events(await service.stream(job(stream=True)))
    assert without_usage[-1] == "[DONE]" and all("usage" not in p for p in without_usage[:-1])


async def test_monitoring_scores_the_answer_alike_whole_and_streamed(service: CompletionService) -> None:
    monitored = job(persona="pirate", persona_monitor=("pirate", "formal"))
    whole = await service.complete(monitored)
    assert set(whole["persona_scores"]) == {"pirate", "formal"}
    payloads = await events(await service.stream(job(persona="pirate", persona_monitor=("pirate", "formal"))))
    final = payloads[-2]
    assert final["persona_scores"] == pytest.approx(whole["persona_scores"], rel=1e-4)
    assert all("persona_scores" not in p for p in payloads[:-2])
    assert "persona_scores" not in await service.complete(job())


async def test_metrics_count_each_request_by_persona_and_finish(
    llama_backend: HFBackend, store: SQLiteStore
) -> None:
    metrics = Metrics()
    service = build_service(llama_backend, store, metrics=metrics)
    await service.complete(job(persona="pirate"))
    await service.complete(job())
    with pytest.raises(RequestRejected):  # refused before admission: not a request the engine ran
        await service.complete(job(max_tokens=65))

    def sample(name: str, persona: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": MODEL, "persona": persona, **labels})

    finished = "persona_server_requests_total"
    assert (sample(finished, "pirate", status="length"), sample(finished, "none", status="length")) == (1, 1)
    assert sample("persona_server_generation_tokens_total", "pirate") == 12
    assert sample("persona_server_time_to_first_token_seconds_count", "pirate") == 1


async def test_an_open_stream_holds_its_admission_place_until_closed(
    llama_backend: HFBackend, store: SQLiteStore
) -> None:
    service = build_service(llama_backend, store, max_in_flight=1)
    first = await service.stream(job(stream=True, max_tokens=40))
    with pytest.raises(Overloaded):
        await service.stream(job(stream=True))
    assert (await anext(first)).startswith("data: ")
    await first.aclose()  # type: ignore[attr-defined]
    second = await events(await service.stream(job(stream=True)))
    assert second[-1] == "[DONE]"
