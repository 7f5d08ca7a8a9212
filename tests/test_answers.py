"""The answer-and-read-back helper (server/engine/answers.py) on a tiny model: answers in order, each
as it would be alone, a bounded number at a time; read back unsteered after the right conversation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from server.engine.answers import ReadBack, answer, answer_all, ask, conversation, read_all, written
from server.engine.base import GenerationRequest, TokenChunk
from server.engine.hf.backend import HFBackend
from server.steering.plan import SteeringPlan

QUESTIONS = ("Tell me about the sea.", "What is the weather today?", "Hello friend.")


class Counting:
    """A backend that counts the answers it writes at once."""

    def __init__(self, inner: HFBackend) -> None:
        self.inner, self.writing, self.most = inner, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        self.writing += 1
        self.most = max(self.most, self.writing)
        try:
            async for chunk in self.inner.generate(request):
                yield chunk
        finally:
            self.writing -= 1


def _plan(backend: HFBackend) -> SteeringPlan:
    vector = np.random.default_rng(3).standard_normal(backend.info.hidden_size).astype(np.float32)
    return SteeringPlan({1: 6.0 * vector / np.linalg.norm(vector)}, strength=1.0)


async def test_answers_come_in_order_each_as_alone_with_at_most_the_bound_in_flight(
    llama_backend: HFBackend,
) -> None:
    requests = [ask(q, max_tokens=8, seed=seed) for seed in (1, 2) for q in QUESTIONS]
    counting, done = Counting(llama_backend), []
    answers = await answer_all(counting, requests, concurrency=2, progress=done.append)  # type: ignore[arg-type]
    alone = [await answer(llama_backend, request) for request in requests]
    assert [(a.request, a.text, a.token_ids) for a in answers] == [
        (a.request, a.text, a.token_ids) for a in alone
    ]
    assert all(written(a) for a in answers) and len({a.token_ids for a in answers}) > 1
    assert counting.most == 2 and done == [1, 2, 3, 4, 5, 6]
    everything = Counting(llama_backend)
    await answer_all(everything, requests)  # type: ignore[arg-type]
    assert everything.most == len(requests)


async def test_an_answer_is_read_back_unsteered_after_its_conversation(llama_backend: HFBackend) -> None:
    asked = conversation("You are a pirate.", QUESTIONS[0])
    request = ask(asked, max_tokens=8, seed=4, steering=_plan(llama_backend))
    (read,) = await answer_all(llama_backend, [request], read=ReadBack(activations=True, nll=True))
    ids = list(read.token_ids)
    plain = GenerationRequest(sampling=request.sampling, messages=asked)
    assert read.activations is not None and read.activations.shape[0] == llama_backend.info.num_layers
    np.testing.assert_allclose(
        read.activations, await llama_backend.response_activations(plain, ids), rtol=1e-5
    )
    assert (read.nll, read.nll_tokens) == pytest.approx(await llama_backend.response_nll(plain, ids))
    # Judged without the system prompt, and by its leading blocks only.
    judged = ReadBack(activations=True, nll=True, blocks=2, without_system=True)
    (alone,) = await read_all(llama_backend, [read], judged)
    user_only = GenerationRequest(sampling=request.sampling, messages=asked[1:])
    assert alone.nll == pytest.approx((await llama_backend.response_nll(user_only, ids))[0])
    assert alone.nll != pytest.approx(read.nll)
    assert alone.activations is not None and alone.activations.shape[0] == 2


async def test_only_the_answers_picked_are_read_and_another_model_reads_them_in_its_tokens(
    llama_backend: HFBackend,
) -> None:
    requests = [ask(q, max_tokens=6, seed=i) for i, q in enumerate(QUESTIONS)]
    picked = ReadBack(nll=True, only=lambda a: a.request.sampling.seed != 1)
    answers = await answer_all(llama_backend, requests, concurrency=1, read=picked)
    assert [a.nll_tokens > 0 for a in answers] == [True, False, True]
    assert all(a.activations is None for a in answers)
    again = answers[0].in_tokens_of(llama_backend)
    assert again.text == answers[0].text and list(again.token_ids) == llama_backend.answer_ids(
        answers[0].text
    )
