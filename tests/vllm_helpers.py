"""What the vLLM engine tests share: the tiny models' steering vectors and plans, greedy requests,
and the comparison of vLLM's greedy answer with the HF engine's (a fork only at a near-tie)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.base import GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.engine.vllm.backend import VLLMBackend
from server.engine.vllm.options import VLLMOptions
from server.steering.plan import Positions, SteeringPlan

# The marks of every vLLM test module: engine starts take about 50 s each; a module shares its engines
# on its own event loop.
VLLM_MARKS = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]
HIDDEN = 128  # vLLM's CPU attention needs a head dimension of at least 32: four heads of 32


@asynccontextmanager
async def vllm_beside_hf(
    model_dir: Path,
    slots: int,
    extra: dict[str, Any] | None = None,
    dtype: str = "float32",
    reference: Path | None = None,
) -> AsyncIterator[tuple[VLLMBackend, HFBackend]]:
    """A vLLM engine (compiled unless ``extra`` says otherwise) on ``model_dir``, and the HF engine on
    the same model (or on ``reference``, the same weights in a form it reads)."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # both cores of this machine
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    options = VLLMOptions(
        dtype=dtype, max_model_len=1024, max_num_seqs=16, steering_slots=slots, extra=extra or {}
    )
    vllm_backend = await asyncio.to_thread(VLLMBackend.load, model_dir, options=options)
    hf_backend = HFBackend.load(reference or model_dir)
    try:
        yield vllm_backend, hf_backend
    finally:
        await vllm_backend.close()
        await hf_backend.close()


def vector(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * scale


def greedy_request(prompt: str, plan: SteeringPlan | None, max_tokens: int = 10) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return GenerationRequest(sampling=sampling, prompt=prompt, steering=plan)


async def greedy(backend: object, prompt: str, plan: SteeringPlan | None, max_tokens: int = 10) -> list[int]:
    ids: list[int] = []
    async for chunk in backend.generate(greedy_request(prompt, plan, max_tokens)):  # type: ignore[attr-defined]
        ids += chunk.token_ids
    return ids


# Two engines' float32 logits differ by ~1e-5 (other kernels, another summation order), so on random
# weights a greedy answer may fork where its two likeliest tokens are that close; vLLM's own tests
# compare engines the same way (check_logprobs_close). A fork anywhere else is a steering fault.
TIE = 1e-3


async def assert_hf_agrees(
    hf_backend: HFBackend, ours: list[int], request: GenerationRequest, name: str = "", tie: float = TIE
) -> None:
    """``ours`` (vLLM's greedy answer) equals the HF engine's answer to ``request``, or is the same up
    to a token where the HF engine's two likeliest tokens tie within ``tie`` and ours is the other."""
    asked = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, logprobs=2))
    chunks = [chunk async for chunk in hf_backend.generate(asked)]
    theirs = [token for chunk in chunks for token in chunk.token_ids]
    if ours == theirs:
        return
    fork = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    assert fork is not None, f"{name}: same tokens, other lengths: {ours} vs {theirs}"
    logprobs = [entry for chunk in chunks for entry in chunk.logprobs or ()]
    top = {token: logprob for token, _, logprob in logprobs[fork].top}
    assert ours[fork] in top and top[theirs[fork]] - top[ours[fork]] < tie, (
        f"{name}: answers fork at {fork} with no tie: {ours} vs {theirs}, HF's top two {top}"
    )


def plans() -> dict[str, SteeringPlan]:
    return {
        "all": SteeringPlan({1: vector(1)}, strength=3.0),
        "prompt": SteeringPlan({0: vector(2), 2: vector(3)}, strength=4.0, positions=Positions.PROMPT),
        "response": SteeringPlan({1: vector(4)}, strength=3.0, positions=Positions.RESPONSE),
        "composed": SteeringPlan.compose(
            [({1: vector(5)}, 2.0, "a"), ({1: vector(6), 2: vector(7)}, -1.5, "b")]
        ),
    }


async def first_step_logprobs(backend: object, prompt: str, plan: SteeringPlan | None) -> dict[int, float]:
    """The five likeliest first tokens and their logprobs: a check that holds where a random model's
    greedy answer is one token repeated (tiny Gemmas with tied embeddings)."""
    request = GenerationRequest(
        sampling=SamplingParams(max_tokens=1, temperature=0, logprobs=5), prompt=prompt, steering=plan
    )
    chunks = [chunk async for chunk in backend.generate(request)]  # type: ignore[attr-defined]
    return {token: logprob for token, _, logprob in chunks[0].logprobs[0].top}


def mixed_requests(count: int = 12) -> list[GenerationRequest]:
    """Greedy requests of random lengths under six distinct plans and none, in turn."""
    rng = random.Random(0)
    words = ["sea", "ship", "wind", "gold", "map", "storm", "island", "crew"]
    catalogue = [None, *plans().values(), SteeringPlan({0: vector(9)}, strength=-2.0)]
    return [
        greedy_request(" ".join(rng.choices(words, k=rng.randint(2, 30))), catalogue[i % len(catalogue)])
        for i in range(count)
    ]
