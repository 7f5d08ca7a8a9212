"""The vLLM engine on every model type users serve (issue 31; docs/architectures.md): one compiled
vLLM engine per type, beside the HF engine on the same tiny random weights. Each type's decoder block
hands its output on in its own way, and steering must add to the residual stream either way: vLLM's
Llama-family, Qwen, Mixtral, Gemma and GPT-OSS blocks return ``(hidden, residual)`` (the stream is
their sum), Granite's returns the scaled stream itself, and OLMo 2 runs through vLLM's Transformers
backend on transformers' own blocks, batch-shaped ``(1, tokens, hidden)``. The Llama, Qwen2 and Phi-3
engines get the full battery in tests/test_vllm_engine.py; these check what differs by type."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import pytest_asyncio

from server.engine.base import GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.steering.plan import SteeringPlan
from tests.api_helpers import alone_and_together
from tests.vllm_helpers import (
    VLLM_MARKS,
    assert_hf_agrees,
    first_step_logprobs,
    greedy,
    greedy_request,
    mixed_requests,
    plans,
    vector,
    vllm_beside_hf,
)

pytest.importorskip("vllm", reason="the vLLM tests need pip install -e '.[vllm]'")
pytestmark = VLLM_MARKS

from server.engine.vllm.backend import VLLMBackend  # noqa: E402

# The types of testkit/tiny_models.py that tests/test_vllm_engine.py does not start.
ARCHITECTURES = ("mistral", "mixtral", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "olmo2", "granite")
ARCHITECTURES += ("gpt_oss",)
SLOTS = 4


@pytest.fixture(scope="module", params=ARCHITECTURES)
def architecture(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(
    architecture: str, vllm_model_dir: Callable[[str], object]
) -> AsyncIterator[tuple[VLLMBackend, HFBackend]]:
    async with vllm_beside_hf(vllm_model_dir(architecture), SLOTS) as engines:
        yield engines


async def test_steered_greedy_tokens_equal_the_hf_engine_at_every_rule(engines) -> None:
    """Compiled as vLLM runs by default, with the steering inside the compiled forward."""
    vllm_backend, hf_backend = engines
    stats = await vllm_backend.worker_stats()
    assert all(s["compiled"] and not s["enforce_eager"] for s in stats)
    before = sum(s["steered_rows"] for s in stats)
    prompt = "the sea and the ship"
    unsteered = await greedy(vllm_backend, prompt, None)
    await assert_hf_agrees(hf_backend, unsteered, greedy_request(prompt, None), "unsteered")
    first = await first_step_logprobs(vllm_backend, prompt, None)
    assert first == pytest.approx(await first_step_logprobs(hf_backend, prompt, None), abs=1e-4)
    for name, plan in plans().items():
        steered = await greedy(vllm_backend, prompt, plan)
        await assert_hf_agrees(hf_backend, steered, greedy_request(prompt, plan), name)
        assert steered != unsteered, f"{name}: steering changed nothing"
        ours = await first_step_logprobs(vllm_backend, prompt, plan)
        assert ours == pytest.approx(await first_step_logprobs(hf_backend, prompt, plan), abs=1e-4), name
        assert ours != pytest.approx(first, abs=1e-3) or plan.positions.value == "response", name
    stats = await vllm_backend.worker_stats()
    assert sum(s["steered_rows"] for s in stats) > before
    assert all(s["missing_sets"] == 0 and s["unslotted"] == 0 for s in stats)


async def test_personas_mixed_in_one_batch_equal_each_alone(engines) -> None:
    vllm_backend, _ = engines
    alone, together, _ = await alone_and_together(vllm_backend, mixed_requests())
    assert together == alone


async def test_read_backs_and_monitoring_equal_the_hf_engine(engines) -> None:
    """The block outputs vLLM reads (read-backs for extraction and fits, and in flight for monitoring)
    are the HF engine's residual stream, within 1e-4 at float32."""
    vllm_backend, hf_backend = engines
    request = GenerationRequest(prompt="the crew of the ship")
    response = [5, 9, 17, 33]
    ours = await vllm_backend.response_activations(request, response, None)
    theirs = await hf_backend.response_activations(request, response, None)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    monitored = GenerationRequest(
        sampling=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
        prompt="the crew and the map",
        steering=SteeringPlan({2: vector(40)}, 3.0),  # after the blocks read: read in flight
        monitor_blocks=2,
    )
    chunks = [chunk async for chunk in vllm_backend.generate(monitored)]
    answer = [token for chunk in chunks for token in chunk.token_ids]
    await assert_hf_agrees(hf_backend, answer, monitored, "monitored")
    assert chunks[-1].response_means is not None
    expected = await hf_backend.response_activations(monitored, answer, 2)
    np.testing.assert_allclose(chunks[-1].response_means, expected, atol=1e-4)
