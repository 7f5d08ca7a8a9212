"""The model types whose vLLM decoder blocks persona-server knows how to steer, and the refusal of
any other at load (docs/architectures.md).

A forward hook steers what a block returns (in_graph.py), and vLLM's blocks return the residual
stream in more than one way. A type is listed only once the suite has checked its steering, reads and
mixed batches against the HF engine (tests/test_vllm_engine.py, tests/test_vllm_architectures.py;
tests/test_coverage_table.py keeps this table equal to those tests), because a block that returned
the stream some other way would be steered wrongly without a word.
"""

from __future__ import annotations

from pathlib import Path

from server.steering.errors import UnsupportedArchitectureError

# model_type -> how its vLLM block hands the stream on: "split", as (hidden, residual) whose sum is the
# stream (the next block's fused add-and-norm adds them); "stream", the stream itself.
BLOCK_OUTPUTS: dict[str, str] = {
    "llama": "split",
    "mistral": "split",  # vLLM runs Mistral as Llama
    "mixtral": "split",
    "qwen2": "split",
    "qwen3": "split",
    "qwen3_moe": "split",
    "gemma2": "split",  # its post-norms are inside the block: hidden is already normed
    "gemma3_text": "split",
    "phi3": "split",
    "granite": "stream",  # the block scales its own branches by residual_multiplier
    "olmo2": "stream",  # vLLM's Transformers backend: transformers' blocks, (1, tokens, hidden)
    "gpt_oss": "split",
}


def check_model_type(source: str | Path) -> str:
    """The model type of the checkpoint at ``source``, or a refusal naming it when vLLM's blocks of
    that type are not known to be steered right."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(source))
    model_type = str(getattr(config, "model_type", "unknown"))
    if model_type not in BLOCK_OUTPUTS:
        architectures = ", ".join(getattr(config, "architectures", None) or [model_type])
        raise UnsupportedArchitectureError(
            f"cannot steer model type '{model_type}' ({architectures}) on the vLLM engine: how its vLLM "
            f"decoder blocks return the residual stream is not known; supported model types: "
            f"{', '.join(sorted(BLOCK_OUTPUTS))}"
        )
    return model_type
