"""The HF engine on every model type it knows (testkit.tiny_models.SUPPORTED_ARCHITECTURES): mixtures of
experts (Mixtral, Qwen3-MoE, GPT-OSS), sliding-window layers and attention sinks (Gemma 2/3, GPT-OSS),
a scaled residual (Granite), norms after the block's branches (OLMo 2, Gemma), beside the dense Llama
family. tests/test_steering_reference.py checks each steered forward against a hand computation; here
the engine itself, with its scheduler, on each: personas mixed in one batch answer as each alone, and
monitoring read in flight equals the read-back of the answer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.engine.model_loading import causal_lm_from_config, load_causal_lm
from server.steering.plan import Positions, SteeringPlan
from testkit.tiny_models import SUPPORTED_ARCHITECTURES, tiny_config
from tests.api_helpers import alone_and_together, random_plan

QUESTIONS = ["where is the treasure", "tell me of the sea", "good morning captain"]
HIDDEN = 64  # testkit's tiny models


@pytest.fixture(scope="module", params=SUPPORTED_ARCHITECTURES)
def engine(request: pytest.FixtureRequest, tiny_model_dir: Callable[[str], Path]) -> Iterator[HFBackend]:
    backend = HFBackend.load(tiny_model_dir(request.param), model_id=f"tiny-{request.param}")
    yield backend
    asyncio.run(backend.close())


def chat(
    question: str, plan: SteeringPlan | None = None, monitor_blocks: int | None = None
) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return GenerationRequest(
        messages=[ChatMessage("user", question)],
        sampling=sampling,
        steering=plan,
        monitor_blocks=monitor_blocks,
    )


async def test_personas_mixed_in_a_batch_answer_as_each_alone(engine: HFBackend) -> None:
    plans = [
        random_plan(1, [0], 4.0, Positions.ALL),
        random_plan(2, [1, 2], 6.0, Positions.RESPONSE),
        random_plan(3, [2], 8.0, Positions.PROMPT),
    ]
    # Every question unsteered (the first three), then under every persona: twelve in one batch.
    requests = [chat(q) for q in QUESTIONS] + [chat(q, plan) for plan in plans for q in QUESTIONS]
    alone, together, _ = await alone_and_together(engine, requests)
    assert together == alone
    assert any(tokens != alone[i % 3] for i, tokens in enumerate(alone[3:]))  # the personas steer


async def answer_with_means(
    engine: HFBackend, request: GenerationRequest
) -> tuple[list[int], np.ndarray | None]:
    chunks = [chunk async for chunk in engine.generate(request)]
    return [token for chunk in chunks for token in chunk.token_ids], chunks[-1].response_means


async def test_monitoring_in_flight_equals_the_read_back(engine: HFBackend) -> None:
    """Unsteered, and steered only after the monitored blocks (blocks 0-1 read, block 2 steered)."""
    requests = [chat(QUESTIONS[0], None, 2), chat(QUESTIONS[1], random_plan(4, [2], 6.0, Positions.ALL), 2)]
    for request, (tokens, means) in zip(
        requests, await asyncio.gather(*(answer_with_means(engine, r) for r in requests)), strict=True
    ):
        assert means is not None and means.shape == (2, HIDDEN)
        unsteered = dataclasses.replace(request, steering=None, monitor_blocks=None)
        read_back = await engine.response_activations(unsteered, tokens, num_blocks=2)
        assert np.abs(means - read_back).max() < 1e-4


def test_gemma2_attention_is_softcapped_as_the_model_asks(tmp_path: Path) -> None:
    """transformers' default attention (sdpa) skips Gemma 2's attention-logit softcapping; only its
    eager attention applies it. The product's loader (every engine build, bakes and the GGUF
    converter go through it) must give the model it was asked for: equal to eager attention. With a
    cap of 1.0 the cap changes the logits, so the check can tell."""
    config = tiny_config("gemma2", 400)
    config.attn_logit_softcapping = 1.0
    causal_lm_from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    prompt = torch.tensor([[5, 17, 42, 9, 100, 23, 7]])

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(prompt).logits

    loaded = logits(load_causal_lm(tmp_path, dtype=torch.float32))
    eager = logits(AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager"))
    uncapped = logits(AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa"))
    assert (eager - uncapped).abs().max().item() > 1e-3  # the cap matters here
    assert (loaded - eager).abs().max().item() < 1e-5
