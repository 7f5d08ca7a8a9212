"""Closed-loop steering on the HF engine: per-token readings, a target's controller, rules.

The references are hand computations on the same model: a greedy decode through transformers with a
forward hook adding the rule's vector exactly at the passes it should, or the block outputs read by
``output_hidden_states``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from server.engine.base import ChatMessage, GenerationRequest, ModelInfo, SamplingParams, TokenChunk
from server.engine.hf.backend import HFBackend
from server.serving.completion_job import CompletionJob, PersonaTerm, TargetTerm, WhenRule
from server.serving.errors import RequestRejected
from server.serving.protocol.requests import ChatCompletionRequest
from server.serving.steering_loops import check_loop
from server.steering.closed_loop import (
    Direction,
    LoopSpec,
    Rule,
    SteeringLoop,
    Target,
    TokenTrace,
    fired_runs,
    pushed_by,
)
from server.steering.plan import Positions, SteeringPlan

QUESTION = "where is the treasure"
HIDDEN = 64


def vector(seed: int) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def chat(loop: LoopSpec | None, max_tokens: int = 16, plan: SteeringPlan | None = None) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(
        messages=[ChatMessage("user", QUESTION)], sampling=sampling, steering=plan, loop=loop
    )


async def collect(backend: HFBackend, request: GenerationRequest) -> list[TokenChunk]:
    return [chunk async for chunk in backend.generate(request)]


def tokens_of(chunks: Sequence[TokenChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


def traces_of(chunks: Sequence[TokenChunk]) -> list[TokenTrace]:
    return [trace for chunk in chunks for trace in chunk.traces or ()]


def reference_decode(
    backend: HFBackend, steer: dict[int, torch.Tensor], steered_passes: set[int], max_tokens: int
) -> list[int]:
    """Greedy tokens, with ``steer`` (block -> addition) added at the fed position of the passes in
    ``steered_passes`` (pass 0 is the prompt's, pass i feeds answer token i-1)."""
    model = backend._runner.model
    blocks = backend._runner.layout.blocks
    prompt = backend.prompt_ids(chat(None))
    active = {"on": False}

    def hook(block: int) -> Callable[..., Any]:
        def add(_module: torch.nn.Module, _args: object, output: Any) -> Any:
            if not active["on"]:
                return None
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            hidden = hidden.clone()
            hidden[:, -1] += steer[block]
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        return add

    handles = [blocks[block].register_forward_hook(hook(block)) for block in steer]
    try:
        cache, tokens, fed = DynamicCache(), [], torch.tensor([prompt])
        with torch.inference_mode():
            for step in range(max_tokens):
                active["on"] = step in steered_passes
                logits = model(input_ids=fed, past_key_values=cache, use_cache=True).logits[0, -1]
                tokens.append(int(logits.argmax()))
                fed = torch.tensor([[tokens[-1]]])
    finally:
        for handle in handles:
            handle.remove()
    return tokens


# --- the loop's maths ------------------------------------------------------------------------------


def test_pushed_by_carries_each_addition_to_every_later_block() -> None:
    a, b = torch.ones(3), torch.full((3,), 2.0)
    pushed = pushed_by({1: a, 3: b}, num_blocks=5)
    assert set(pushed) == {1, 2, 3, 4}
    assert torch.equal(pushed[2], a) and torch.equal(pushed[4], a + b)


def test_a_reading_takes_out_what_steering_pushed() -> None:
    unit = torch.zeros(4)
    unit[0] = 1.0
    direction = Direction.of("p", {1: unit * 3})  # stored unscaled; read as a unit vector
    outputs = torch.tensor([[0.0, 0, 0, 0], [5.0, 1, 0, 0]])
    assert direction.read(outputs, {}) == pytest.approx(5.0)
    assert direction.read(outputs, pushed_by({0: torch.tensor([2.0, 0, 0, 0])}, 2)) == pytest.approx(3.0)


def _target_loop(score: float, gain: float = 0.5, bound: float = 3.0) -> SteeringLoop:
    direction = Direction.of("p", {0: vector(1)})
    target = Target(direction, {0: vector(1)}, score, initial_strength=1.0, max_strength=bound, gain=gain)
    return SteeringLoop(LoopSpec(target=target))


def test_the_controller_moves_toward_the_target_and_stays_within_its_bound() -> None:
    unit = vector(1) / torch.linalg.vector_norm(vector(1))
    for score, sign in ((10.0, 1), (-10.0, -1)):
        loop = _target_loop(score)
        strengths = []
        for _ in range(40):
            outputs = (2.0 * unit + loop.deltas().get(0, torch.zeros(HIDDEN))).unsqueeze(0)  # reads 2.0
            strengths.append(loop.observe(outputs).strength)
        assert strengths[0] == 1.0
        assert sign * (strengths[1] - strengths[0]) > 0  # the error's sign says where the strength goes
        assert all(abs(s) <= 3.0 for s in strengths)
        assert strengths[-1] == pytest.approx(3.0 * sign)  # held at the bound while the error stays
    at_target = _target_loop(2.0)
    outputs = (2.0 * unit + at_target.deltas()[0]).unsqueeze(0)
    at_target.observe(outputs)
    assert at_target.strength == pytest.approx(1.0)  # no error, no move


def _rule_traces(for_tokens: int | None, readings: list[float], rerun: bool = False) -> list[tuple[int, ...]]:
    monitor = Direction.of("m", {0: torch.tensor([1.0, 0.0])})
    rule = Rule(monitor, 0.5, True, "q", {0: torch.tensor([0.0, 1.0])}, strength=2.0, for_tokens=for_tokens)
    loop = SteeringLoop(LoopSpec(rules=(rule,)))
    applied = []
    for index, reading in enumerate(readings):
        applied.append(loop.observe(torch.tensor([[reading, 0.0]])).rules)
        if rerun and index == 0:
            loop.rerun()
    return applied


def test_a_rule_with_for_tokens_steers_that_many_tokens_whatever_the_readings() -> None:
    # token i's pass runs under what the readings of tokens < i decided
    applied = _rule_traces(2, [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert applied == [(), (), (0,), (0,), (), (), (0,), (0,), (0,)]  # fires again on a reading past it
    assert fired_runs(applied) == [{"rule": 0, "token": 2, "tokens": 2}, {"rule": 0, "token": 6, "tokens": 3}]


def test_a_rule_without_for_tokens_steers_until_the_reading_drops_back() -> None:
    applied = _rule_traces(None, [0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert applied == [(), (), (0,), (0,), (), (0,)]


def test_the_prompt_run_again_counts_as_a_rule_token() -> None:
    assert _rule_traces(2, [1.0, 0.0, 0.0]) == [(), (0,), (0,)]
    # Fired on the prompt's reading, token 0 is chosen again under it: one token is left of two.
    assert _rule_traces(2, [1.0, 0.0, 0.0], rerun=True)[1:] == [(0,), ()]


# --- on the HF engine ------------------------------------------------------------------------------


def _monitor(seed: int) -> Direction:
    return Direction.of("m", {1: vector(seed)})


async def test_token_scores_are_the_block_outputs_read_in_the_pass_that_chose_each_token(
    llama_backend: HFBackend,
) -> None:
    direction = _monitor(3)
    chunks = await collect(llama_backend, chat(LoopSpec(token_scores=(direction,)), max_tokens=8))
    tokens = tokens_of(chunks)
    assert tokens == tokens_of(await collect(llama_backend, chat(None, max_tokens=8)))
    prompt = llama_backend.prompt_ids(chat(None))
    with torch.inference_mode():
        hidden = llama_backend._runner.model(
            input_ids=torch.tensor([prompt + tokens[:-1]]), output_hidden_states=True
        ).hidden_states[2][0]  # block 1's output
    unit = direction.units[1]
    expected = [float(hidden[len(prompt) - 1 + i] @ unit) for i in range(len(tokens))]
    got = [trace.scores["m"] for trace in traces_of(chunks)]
    assert got == pytest.approx(expected, abs=1e-4)


async def test_a_rule_that_never_fires_leaves_the_answer_bit_for_bit_unsteered(
    llama_backend: HFBackend,
) -> None:
    rule = Rule(_monitor(3), 1e9, True, "q", {1: vector(5)}, strength=8.0)
    plain = await collect(llama_backend, chat(None, max_tokens=12))
    ruled, other = await asyncio.gather(
        collect(llama_backend, chat(LoopSpec(rules=(rule,)), max_tokens=12)),
        collect(llama_backend, chat(None, max_tokens=12)),  # in the same batch
    )
    assert tokens_of(ruled) == tokens_of(plain) == tokens_of(other)
    assert all(trace.rules == () for trace in traces_of(ruled))
    assert fired_runs([trace.rules for trace in traces_of(ruled)]) == []


async def test_a_rule_that_fires_steers_from_the_next_token_on(llama_backend: HFBackend) -> None:
    direction, steer = _monitor(3), {1: 6.0 * vector(5)}
    plain_chunks = await collect(llama_backend, chat(LoopSpec(token_scores=(direction,)), max_tokens=16))
    scores = [trace.scores["m"] for trace in traces_of(plain_chunks)]
    # The first token from the third on whose reading beats every earlier one: the rule fires there.
    fire = next(i for i in range(2, len(scores)) if scores[i] > max(scores[:i]))
    threshold = max(scores[:fire]) + 1e-6
    rule = Rule(direction, threshold, True, "q", {1: vector(5)}, strength=6.0, for_tokens=3)
    chunks = await collect(llama_backend, chat(LoopSpec(rules=(rule,)), max_tokens=16))
    tokens, applied = tokens_of(chunks), [trace.rules for trace in traces_of(chunks)]
    assert tokens[: fire + 1] == tokens_of(plain_chunks)[: fire + 1]  # up to the token that crossed
    assert applied[: fire + 1] == [()] * (fire + 1) and applied[fire + 1] == (0,)
    assert tokens != tokens_of(plain_chunks)
    # By hand: the rule's vector added exactly at the passes the answer says it steered.
    steered = {index for index, rules in enumerate(applied) if rules}
    assert tokens == reference_decode(llama_backend, steer, steered, max_tokens=16)
    runs = fired_runs(applied)
    assert runs[0]["token"] == fire + 1 and runs[0]["tokens"] >= 3


async def test_a_target_steers_its_persona_at_the_reported_strengths(llama_backend: HFBackend) -> None:
    direction = _monitor(3)
    target = Target(direction, {1: vector(3)}, score=50.0, initial_strength=0.5, max_strength=4.0, gain=0.5)
    chunks = await collect(llama_backend, chat(LoopSpec(target=target), plan=None, max_tokens=10))
    strengths = [trace.strength for trace in traces_of(chunks)]
    assert strengths[0] == 0.5 and strengths[1] > strengths[0]  # far below the target: it rises
    assert all(abs(s) <= 4.0 for s in strengths)
    # The same strengths replayed by hand give the same tokens (the prompt's pass runs unsteered here).
    tokens = tokens_of(chunks)
    replay = await _replay(llama_backend, vector(3), strengths)
    assert tokens == replay


async def _replay(backend: HFBackend, persona: torch.Tensor, strengths: list[float]) -> list[int]:
    model, blocks = backend._runner.model, backend._runner.layout.blocks
    prompt = backend.prompt_ids(chat(None))
    step = {"strength": 0.0}

    def add(_module: torch.nn.Module, _args: object, output: Any) -> Any:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        hidden = hidden.clone()
        hidden[:, -1] += step["strength"] * persona
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handle = blocks[1].register_forward_hook(add)
    try:
        cache, tokens, fed = DynamicCache(), [], torch.tensor([prompt])
        with torch.inference_mode():
            for index, strength in enumerate(strengths):
                step["strength"] = strength if index > 0 else 0.0
                logits = model(input_ids=fed, past_key_values=cache, use_cache=True).logits[0, -1]
                tokens.append(int(logits.argmax()))
                fed = torch.tensor([[tokens[-1]]])
    finally:
        handle.remove()
    return tokens


async def test_a_rule_that_fires_on_the_prompt_steers_the_answer_from_its_first_token(
    llama_backend: HFBackend,
) -> None:
    rule = Rule(_monitor(3), -1e9, True, "q", {1: vector(5)}, 6.0, for_tokens=2, positions=Positions.RESPONSE)
    other = Rule(_monitor(3), 1e9, True, "q", {1: vector(5)}, strength=6.0)  # never fires
    chunks = await collect(llama_backend, chat(LoopSpec(rules=(other, rule)), max_tokens=10))
    applied = [trace.rules for trace in traces_of(chunks)]
    assert set(applied) == {(1,)}  # fired on the prompt, and again after each two tokens
    # By hand: the prompt's pass with the vector at its last token (the persona's positions: the
    # response's), then every pass after it.
    expected = reference_decode(llama_backend, {1: 6.0 * vector(5)}, set(range(10)), max_tokens=10)
    assert tokens_of(chunks) == expected != tokens_of(await collect(llama_backend, chat(None, max_tokens=10)))


async def test_a_rule_of_a_prompt_persona_fired_on_the_prompt_steers_the_prompt_as_a_request_would(
    llama_backend: HFBackend,
) -> None:
    steer = {1: vector(5)}
    rule = Rule(_monitor(3), -1e9, True, "q", steer, 6.0, for_tokens=2, positions=Positions.PROMPT)
    chunks = await collect(llama_backend, chat(LoopSpec(rules=(rule,)), max_tokens=10))
    # It steered the prompt, so every token; it fires no more (no vector on the generated tokens).
    assert [trace.rules for trace in traces_of(chunks)] == [(0,)] * 10
    fixed = chat(None, max_tokens=10, plan=SteeringPlan(steer, strength=6.0, positions=Positions.PROMPT))
    assert tokens_of(chunks) == tokens_of(await collect(llama_backend, fixed))


def test_an_engine_without_closed_loops_refuses_them_naming_the_field() -> None:
    info = ModelInfo(
        id="m", backend="vllm", num_layers=3, hidden_size=HIDDEN, max_context=64, steerable_layers=(0, 1, 2)
    )
    messages = [ChatMessage("user", QUESTION)]
    sampling = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": QUESTION}])
    for fields, param in (
        ({"persona_target": TargetTerm("p", 1.0)}, "persona_target"),
        ({"persona_when": (WhenRule("p", 1.0, True, PersonaTerm("q")),)}, "persona_when"),
        ({"persona_monitor": ("p",), "monitor_tokens": True}, "persona_monitor_tokens"),
    ):
        with pytest.raises(RequestRejected) as refused:
            check_loop(CompletionJob(model="m", sampling=sampling, messages=messages, **fields), info)
        assert refused.value.param == param and "vllm engine" in str(refused.value)
