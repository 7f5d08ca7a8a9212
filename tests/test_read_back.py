"""Answers read for monitoring: read back (batched, padded, stopped early) or while generating, both
equal to a plain unsteered forward."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.steering.plan import SteeringPlan

QUESTIONS = ["hello friend", "what is the weather today in the harbor town", "a storm"]
RESPONSES = [[5, 9, 14], [21, 2, 13, 6, 10, 4, 16, 30, 31], [7]]


def request(question: str) -> GenerationRequest:
    return GenerationRequest(messages=[ChatMessage("user", question)], sampling=SamplingParams(max_tokens=8))


def expected_means(llama_dir: Path, tokens: list[int], start: int) -> np.ndarray:
    """By hand: one unpadded forward of the whole model, each block's output caught by a hook."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    outputs: list[torch.Tensor] = []
    for block in model.model.layers:
        block.register_forward_hook(lambda _m, _a, output: outputs.append(output[0, start:].mean(dim=0)))
    with torch.inference_mode():
        model(input_ids=torch.tensor([tokens]))
    return torch.stack(outputs).numpy()


async def test_read_backs_asked_together_equal_each_forward_alone(
    llama_backend: HFBackend, llama_dir: Path
) -> None:
    requests = [request(question) for question in QUESTIONS]
    together = await asyncio.gather(
        *(
            llama_backend.response_activations(r, response)
            for r, response in zip(requests, RESPONSES, strict=True)
        )
    )
    for r, response, got in zip(requests, RESPONSES, together, strict=True):
        prompt = llama_backend.prompt_ids(r)
        expected = expected_means(llama_dir, prompt + response, len(prompt))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-5


async def test_a_read_back_of_the_first_blocks_equals_the_full_one_there(llama_backend: HFBackend) -> None:
    r = request(QUESTIONS[1])
    full = await llama_backend.response_activations(r, RESPONSES[1])
    first_two = await llama_backend.response_activations(r, RESPONSES[1], num_blocks=2)
    assert first_two.shape == (2, full.shape[1])
    assert np.abs(first_two - full[:2]).max() < 1e-5


def monitored(
    question: str, max_tokens: int, blocks: int, plan: SteeringPlan | None = None
) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(
        messages=[ChatMessage("user", question)], sampling=sampling, steering=plan, monitor_blocks=blocks
    )


async def run(backend: HFBackend, request: GenerationRequest) -> tuple[list[int], np.ndarray | None]:
    chunks = [chunk async for chunk in backend.generate(request)]
    assert all(chunk.response_means is None for chunk in chunks[:-1])
    return [token for chunk in chunks for token in chunk.token_ids], chunks[-1].response_means


def later_block_plan() -> SteeringPlan:
    return SteeringPlan({2: torch.randn(64, generator=torch.Generator().manual_seed(3))}, strength=4.0)


async def test_monitored_answers_are_read_while_generating_as_a_read_back_would(
    llama_backend: HFBackend,
) -> None:
    """Unsteered, or steered only after the monitored blocks: the engine reads the block outputs as it
    generates (batched with others), equal to the unsteered read-back, and the answer is unchanged."""
    requests = [
        monitored(QUESTIONS[0], 12, 2),
        monitored(QUESTIONS[1], 1, 2),  # finishes on its first token: read one step later
        monitored(QUESTIONS[2], 9, 2, later_block_plan()),
    ]
    results = await asyncio.gather(*(run(llama_backend, request) for request in requests))
    for request, (tokens, means) in zip(requests, results, strict=True):
        plain = dataclasses.replace(request, monitor_blocks=None)
        assert (await run(llama_backend, plain))[0] == tokens  # monitoring changes nothing in the answer
        assert means is not None and means.shape == (2, 64)
        read_back = await llama_backend.response_activations(
            dataclasses.replace(request, steering=None, monitor_blocks=None), tokens, num_blocks=2
        )
        assert np.abs(means - read_back).max() < 1e-4


async def test_steering_before_the_monitored_blocks_leaves_monitoring_to_the_read_back(
    llama_backend: HFBackend,
) -> None:
    early = SteeringPlan({0: torch.randn(64, generator=torch.Generator().manual_seed(4))}, strength=4.0)
    _, means = await run(llama_backend, monitored(QUESTIONS[0], 6, 2, early))
    assert means is None  # block 0 is steered: its outputs during generation are not the unsteered ones
