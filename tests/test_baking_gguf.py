"""A baked adapter leaves for llama.cpp: as a GGUF LoRA on the base's GGUF it computes what the merged
model computes (and what transformers computes with the peft adapter)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.baking.outputs import save_adapter, save_merged
from server.gguf.lora import convert_lora_to_gguf
from server.gguf.model import convert_hf_to_gguf
from tests.llama_cpp_reference import exact_llama, llama_cpp_logits

pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]  # LoRA conversions and three llama.cpp loads a test


def _logits(path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    extra = {} if lora is None else {"lora_path": str(lora)}
    model = exact_llama(path, n_ctx=128, **extra)
    try:
        return llama_cpp_logits(model, ids, None)
    finally:
        model.close()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "phi3"])
def test_a_gguf_lora_on_the_base_equals_the_merged_model(
    architecture: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base_dir = tiny_model_dir(architecture)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = [
        n
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_up_proj", "down_proj")
        if any(name.endswith(n) for name, _ in model.named_modules())
    ]
    # init_lora_weights=False: random A and B, so that every adapted projection changes the output.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    ids = [1, 7, 12, 30, 41, 5, 19]
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    adapter = save_adapter(peft_model, tmp_path / "adapter", {"persona": "test"})
    merged = save_merged(peft_model, AutoTokenizer.from_pretrained(base_dir), tmp_path / "merged", {})
    base_gguf = convert_hf_to_gguf(base_dir, tmp_path / "base.gguf")
    lora_gguf = convert_lora_to_gguf(adapter, base_dir, tmp_path / "adapter.gguf")
    merged_gguf = convert_hf_to_gguf(merged, tmp_path / "merged.gguf")
    with_lora, merged_logits, plain = (
        _logits(base_gguf, ids, lora_gguf),
        _logits(merged_gguf, ids),
        _logits(base_gguf, ids),
    )
    assert np.abs(merged_logits - expected).max() < 1e-3
    assert np.abs(with_lora - expected).max() < 1e-3
    assert np.abs(plain - expected).max() > 1e-2  # the adapter matters
