"""The HF engine under concurrency: joining mid-batch, cancellation. (Personas at once answering as each
alone is checked on every engine in tests/test_engine_shared.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.engine.base import (
    ChatMessage,
    EngineError,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from server.engine.hf.backend import HFBackend
from server.steering.errors import SteeringError
from server.steering.plan import Positions, SteeringPlan
from tests.api_helpers import random_plan, wait_until_async

QUESTIONS = [
    "hello friend",
    "what is the weather today",
    "tell me of the sea",
    "where is the treasure",
    "a storm comes",
    "good morning captain",
    "bread and tea",
    "the map shows north",
]


def chat(
    question: str, max_tokens: int = 24, plan: SteeringPlan | None = None, **sampling: object
) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    return GenerationRequest(messages=[ChatMessage("user", question)], sampling=params, steering=plan)


async def collect(backend: HFBackend, request: GenerationRequest) -> list[TokenChunk]:
    return [chunk async for chunk in backend.generate(request)]


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


async def test_a_request_joining_mid_batch_gets_its_solo_tokens(llama_backend: HFBackend) -> None:
    long_request = chat(QUESTIONS[1], max_tokens=60, plan=random_plan(7, [1], 4.0, Positions.ALL))
    late_request = chat(QUESTIONS[2], max_tokens=8, plan=random_plan(8, [0, 2], 2.0, Positions.RESPONSE))
    solo_long = tokens_of(await collect(llama_backend, long_request))
    solo_late = tokens_of(await collect(llama_backend, late_request))

    long_chunks: list[TokenChunk] = []
    late_task: asyncio.Task[list[TokenChunk]] | None = None
    long_progress_when_late_finished: list[int] = []
    async for chunk in llama_backend.generate(long_request):
        long_chunks.append(chunk)
        if len(long_chunks) == 5:
            late_task = asyncio.create_task(collect(llama_backend, late_request))
            late_task.add_done_callback(lambda _: long_progress_when_late_finished.append(len(long_chunks)))
    assert late_task is not None and late_task.done()
    # The late request did not wait for the long one: it finished while the long one was decoding.
    assert long_progress_when_late_finished[0] < 40
    assert tokens_of(long_chunks) == solo_long
    assert tokens_of(late_task.result()) == solo_late


@pytest.mark.slow  # 400 decode steps slowed to 10 ms each
async def test_a_cancelled_request_frees_its_slot(
    llama_backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = llama_backend.scheduler
    # Slow every decode step down (the tiny model decodes a token in well under a millisecond), so
    # the survivor cannot finish while the second request is still being read, even when the event
    # loop falls far behind the scheduler thread on a loaded machine.
    decode_step = scheduler._decode_step

    def slowed() -> None:
        time.sleep(0.01)
        decode_step()

    monkeypatch.setattr(scheduler, "_decode_step", slowed)
    length = 400
    survivor = asyncio.create_task(collect(llama_backend, chat(QUESTIONS[3], max_tokens=length)))
    await wait_until_async(lambda: scheduler.num_running == 1, 10, "scheduler.num_running == 1 never held")

    stream = llama_backend.generate(chat(QUESTIONS[4], max_tokens=length))
    for _ in range(3):
        await anext(stream)
    # Read the batch on the scheduler thread, between two decode steps, so the two numbers agree.
    snapshot = scheduler.run_on_model(lambda: (scheduler.num_running, scheduler.kv_batch.size))
    assert await asyncio.wrap_future(snapshot) == (2, 2)
    await stream.aclose()

    await wait_until_async(
        lambda: scheduler.num_running == 1 and scheduler.kv_batch.size == 1,
        10,
        "scheduler.num_running == 1 and scheduler.kv_batch.size == 1 never held",
    )
    assert not survivor.done()
    chunks = await survivor
    assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].completion_tokens == length
    await wait_until_async(
        lambda: scheduler.num_running == 0 and scheduler.kv_batch.cache is None,
        10,
        "scheduler.num_running == 0 and scheduler.kv_batch.cache is None never held",
    )


async def test_usage_counts_and_finish_reasons(llama_backend: HFBackend) -> None:
    chunks = await collect(llama_backend, chat(QUESTIONS[0], max_tokens=7))
    prompt_ids = llama_backend.prompt_ids(chat(QUESTIONS[0]))
    assert [c.completion_tokens for c in chunks] == list(range(1, 8))
    assert all(c.prompt_tokens == len(prompt_ids) for c in chunks)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_stop_string_ends_the_generation_and_is_not_returned(llama_backend: HFBackend) -> None:
    full = await collect(llama_backend, chat(QUESTIONS[5], max_tokens=30))
    text = "".join(c.text for c in full)
    stop = text[10:13]
    assert stop and text.find(stop) == 10, "pick a stop string that first appears at offset 10"
    stopped = await collect(llama_backend, chat(QUESTIONS[5], max_tokens=30, stop=(stop,)))
    assert "".join(c.text for c in stopped) == text[:10]
    assert stopped[-1].finish_reason is FinishReason.STOP


async def test_seeded_sampling_is_reproducible_in_a_batch(llama_backend: HFBackend) -> None:
    def sampled(seed: int) -> GenerationRequest:
        params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=seed, ignore_eos=True)
        return GenerationRequest(prompt="the captain sails", sampling=params)

    alone = tokens_of(await collect(llama_backend, sampled(1)))
    batched = await asyncio.gather(*(collect(llama_backend, sampled(s)) for s in (1, 2, 1)))
    assert tokens_of(batched[0]) == alone == tokens_of(batched[2])
    assert tokens_of(batched[1]) != alone


async def test_bad_requests_are_refused_before_generation(llama_backend: HFBackend) -> None:
    with pytest.raises(EngineError, match="maximum context length"):
        await collect(llama_backend, chat(QUESTIONS[0], max_tokens=5000))
    with pytest.raises(SteeringError, match="hidden size"):
        await collect(llama_backend, chat(QUESTIONS[0], plan=SteeringPlan({0: torch.ones(65)})))
    with pytest.raises(SteeringError, match="layer 7 does not exist"):
        await collect(llama_backend, chat(QUESTIONS[0], plan=SteeringPlan({7: torch.ones(64)})))
    await wait_until_async(
        lambda: llama_backend.scheduler.num_running == 0, 10, "scheduler.num_running == 0 never held"
    )


async def test_n_answers_share_one_prefill_row(
    llama_backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[int] = []
    prefill = llama_backend._runner.prefill

    def counting(prompts: list[list[int]], plans: list[SteeringPlan | None]) -> object:
        rows.append(len(prompts))
        return prefill(prompts, plans)

    monkeypatch.setattr(llama_backend._runner, "prefill", counting)
    plan = random_plan(7, [1], 4.0, Positions.ALL)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4, ignore_eos=True)
    request = GenerationRequest(prompt="the captain sails", sampling=params, steering=plan, n=3)
    chunks = await collect(llama_backend, request)
    assert rows == [1]  # three answers, one prompt row in one forward pass
    answers = [[t for c in chunks if c.index == i for t in c.token_ids] for i in range(3)]
    for index, answer in enumerate(answers):
        alone = GenerationRequest(
            prompt="the captain sails", sampling=request.choice_sampling(index), steering=plan
        )
        assert answer == tokens_of(await collect(llama_backend, alone))
    assert len({tuple(answer) for answer in answers}) == 3


def test_penalties_are_those_of_transformers_and_openai() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    from server.engine.sampling import processed_logits
    from server.engine.sequence import Sequence
    from server.engine.text_stream import TextStream

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    prompt, output = [3, 4, 4], [4, 9, 9, 9]

    def sequence(**sampling: float) -> Sequence:
        params = SamplingParams(max_tokens=8, **sampling)  # type: ignore[arg-type]
        return Sequence(prompt, params, None, TextStream(None), print, 8, output_ids=list(output))

    repeated = processed_logits(logits, sequence(repetition_penalty=1.7), set())
    reference = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits[None].clone())[
        0
    ]
    assert torch.allclose(repeated, reference)
    penalized = processed_logits(logits, sequence(frequency_penalty=0.5, presence_penalty=0.25), set())
    expected = logits.clone()
    expected[4] -= 0.5 * 1 + 0.25
    expected[9] -= 0.5 * 3 + 0.25
    assert torch.allclose(penalized, expected)  # prompt tokens are not penalized by these two
    held = processed_logits(logits, sequence(min_tokens=5, stop_token_ids=(7,)), {2})
    assert held[2] == held[7] == float("-inf") and torch.equal(held[:2], logits[:2])
    assert torch.equal(processed_logits(logits, sequence(min_tokens=4, stop_token_ids=(7,)), {2}), logits)
