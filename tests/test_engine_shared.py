"""What both engines share (server/engine/scheduler.py, read_back.py), checked on each: requests with
different personas at once answer as each alone, a failed step fails its requests and the engine goes
on, closing fails what is still running, and read-backs refuse an empty answer and clamp the blocks
they read. (vLLM's engine answers the same check in tests/test_vllm_engine.py, where its engines are.)"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.engine.base import ChatMessage, EngineError, GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.engine.llamacpp.backend import LlamaCppBackend
from server.steering.plan import Positions
from tests.api_helpers import alone_and_together, random_plan, wait_until_async

QUESTIONS = ["where is the treasure", "tell me of the sea", "good morning captain", "a storm comes"]
ANSWER = [5, 9, 14, 21]

Engine = HFBackend | LlamaCppBackend


def chat(question: str, max_tokens: int = 8) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(messages=[ChatMessage("user", question)], sampling=sampling)


async def tokens(backend: Engine, request: GenerationRequest) -> list[int]:
    return [t for chunk in [c async for c in backend.generate(request)] for t in chunk.token_ids]


def load(kind: str, request: pytest.FixtureRequest) -> Engine:
    if kind == "hf":
        return HFBackend.load(request.getfixturevalue("llama_dir"), model_id="tiny-llama")
    gguf: Path = request.getfixturevalue("llama_gguf")
    return LlamaCppBackend.load(gguf, contexts=2, sequences_per_context=4, kv_type="f32")


@pytest.fixture(scope="module", params=["hf", pytest.param("gguf", marks=pytest.mark.llama_cpp)])
def backend(request: pytest.FixtureRequest) -> Iterator[Engine]:
    engine = load(request.param, request)
    yield engine
    asyncio.run(engine.close())


# On llama.cpp the same twelve requests took from 2 s to 65 s here, run to run (with one context or
# two): slow, and a lead for the llama.cpp engine's scheduling.
@pytest.mark.parametrize(
    "backend",
    ["hf", pytest.param("gguf", marks=[pytest.mark.llama_cpp, pytest.mark.slow])],
    indirect=True,
)
async def test_concurrent_personas_equal_their_solo_runs(backend: Engine) -> None:
    """Twelve requests at once over five personas (each its own blocks, strength and positions) and
    none: requests share lanes and batch rows, wait for them, and answer token for token what each
    answers alone. llama.cpp's control vectors cannot steer block 0, so only the HF engine's are
    steered there too."""
    block_sets = [[1], [2], [1, 2]] + ([[0], [0, 2]] if isinstance(backend, HFBackend) else [])
    positions = list(Positions)
    plans = [None] + [
        random_plan(20 + i, block_sets[i % len(block_sets)], 2.0 + i, positions[i % len(positions)])
        for i in range(5)
    ]
    requests = [dataclasses.replace(chat(QUESTIONS[i % 4], 12), steering=plans[i % 6]) for i in range(12)]
    alone, together, arrivals = await alone_and_together(backend, requests)
    assert together == alone
    assert len(set(arrivals[: len(requests)])) > 1  # they ran interleaved, not one after another
    assert len({tuple(tokens) for tokens in alone}) > 4  # the personas steer: the answers differ


async def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(
    backend: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await tokens(backend, chat(QUESTIONS[0]))

    def broken(*_args: object) -> None:
        raise RuntimeError("the decode step broke")

    monkeypatch.setattr(backend.scheduler, "_decode_step", broken)
    failed = await asyncio.wait_for(
        asyncio.gather(*(tokens(backend, chat(q)) for q in QUESTIONS), return_exceptions=True), timeout=60
    )
    assert all(isinstance(result, RuntimeError) and "step broke" in str(result) for result in failed)
    monkeypatch.undo()
    assert await tokens(backend, chat(QUESTIONS[0])) == before
    # The last chunk goes out just before its row leaves the batch.
    await wait_until_async(lambda: backend.scheduler.num_running == 0, 5, "a row stayed in the batch")
    assert (backend.scheduler.num_running, backend.scheduler.num_waiting) == (0, 0)


@pytest.mark.parametrize("kind", ["hf", pytest.param("gguf", marks=pytest.mark.llama_cpp)])
async def test_closing_the_engine_fails_the_requests_it_still_runs(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = load(kind, request)
    # Slow every decode step, so the request is still running when the engine closes.
    decode_step = engine.scheduler._decode_step

    def slowed(*args: object) -> None:
        time.sleep(0.01)
        decode_step(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.scheduler, "_decode_step", slowed)
    stream = engine.generate(chat(QUESTIONS[1], max_tokens=200))
    await anext(stream)  # type: ignore[arg-type]
    await engine.close()
    with pytest.raises(RuntimeError, match="the engine is shutting down"):
        async for _ in stream:
            pass


async def test_an_empty_answer_cannot_be_read_back(backend: Engine) -> None:
    request = chat(QUESTIONS[2])
    with pytest.raises(EngineError, match="an empty response cannot be read back"):
        await backend.response_nll(request, [])
    with pytest.raises(EngineError, match="an empty response cannot be read back"):
        await backend.response_activations(request, [])


async def test_the_blocks_read_back_are_clamped_to_the_model(backend: Engine) -> None:
    request = chat(QUESTIONS[3])
    every_block = await backend.response_activations(request, ANSWER)
    assert every_block.shape == (3, 64)
    at_least_one = await backend.response_activations(request, ANSWER, num_blocks=0)
    at_most_all = await backend.response_activations(request, ANSWER, num_blocks=99)
    assert at_least_one.shape == (1, 64) and np.abs(at_least_one - every_block[:1]).max() < 1e-5
    assert at_most_all.shape == (3, 64) and np.abs(at_most_all - every_block).max() < 1e-5
