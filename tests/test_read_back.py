"""Answers read back for monitoring: batched, left-padded and stopped early, equal to a plain forward."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend

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
