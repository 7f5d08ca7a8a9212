"""The in-place growing KV cache: the same logits as transformers' concatenating cache, fewer copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from server.engine.hf.kv_batch import KVBatch
from server.engine.hf.kv_cache import SPARE_POSITIONS, GrowingCache
from server.engine.hf.runner import ModelRunner

PROMPTS = [[5, 17, 42, 9, 100, 23, 7], [11, 12, 13], [3, 8, 21, 2, 13, 6, 10, 4, 16, 30]]


def decode_run(runner: ModelRunner, steps: int) -> list[torch.Tensor]:
    """Prefill three prompts, decode, drop the middle row halfway, then let a new prompt join."""
    logits, cache, mask = runner.prefill(PROMPTS, [None] * 3)
    batch = KVBatch()
    batch.append(cache, mask)
    tokens = [int(row.argmax()) for row in logits]
    outputs = []
    for step in range(steps):
        if step == steps // 2:
            batch.keep([0, 2])
            tokens = [tokens[0], tokens[2]]
            joined_logits, joined_cache, joined_mask = runner.prefill([[9, 9, 9, 9]], [None])
            batch.append(joined_cache, joined_mask)
            tokens.append(int(joined_logits[0].argmax()))
        step_logits = runner.decode(batch, tokens, None)
        outputs.append(step_logits)
        tokens = [int(row.argmax()) for row in step_logits]
    return outputs


@pytest.mark.slow  # about 5 s
def test_growing_cache_decodes_as_the_concatenating_one(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    runner = ModelRunner(model)
    steps = SPARE_POSITIONS + 40  # past a buffer's spare room: it grows once while decoding
    growing = decode_run(runner, steps)
    runner.cache_factory = DynamicCache
    concatenating = decode_run(runner, steps)
    for got, expected in zip(growing, concatenating, strict=True):
        assert (got - expected).abs().max().item() < 1e-5


def test_a_decode_step_writes_into_the_buffer_instead_of_copying_it(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    runner = ModelRunner(model)
    logits, cache, mask = runner.prefill(PROMPTS[:1], [None])
    assert isinstance(cache, GrowingCache)
    batch = KVBatch()
    batch.append(cache, mask)
    layer = cache.layers[0]
    storages = []
    for _ in range(SPARE_POSITIONS + 2):
        runner.decode(batch, [int(logits[0].argmax())], None)
        storages.append(layer.keys.untyped_storage().data_ptr())
    # One copy when the prefill's exact-size tensor first fills, then none for SPARE_POSITIONS steps.
    assert len(set(storages)) == 2
    assert layer.keys.shape[-2] == len(PROMPTS[0]) + SPARE_POSITIONS + 2
