"""Logits of one prompt from llama.cpp (with a control-vector buffer) and from transformers (with hooks)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import torch

from server.engine.model_loading import causal_lm_from_config
from testkit.tiny_models import build_tokenizer, tiny_config


def exact_llama(path: Path, n_ctx: int = 256, **extra: Any) -> llama_cpp.Llama:
    """A llama.cpp model that computes what transformers computes: an F32 KV cache, no flash
    attention, every position's logits kept."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        type_k=0,
        type_v=0,
        flash_attn=False,
        n_threads=2,
        verbose=False,
        **extra,
    )


def llama_cpp_logits(model: llama_cpp.Llama, ids: list[int], buffer: np.ndarray | None) -> np.ndarray:
    """Every position's logits under ``buffer`` (floats from block 1 up; shorter is zero-padded)."""
    n_embd, n_layer = model.n_embd(), llama_cpp.llama_model_n_layer(model.model)
    if buffer is None:
        llama_cpp.llama_set_adapter_cvec(model.ctx, None, 0, n_embd, -1, -1)
    else:
        full = np.zeros(n_embd * n_layer, np.float32)  # llama.cpp wants every block from 1 up
        full[: buffer.size] = buffer
        pointer = full.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
        assert llama_cpp.llama_set_adapter_cvec(model.ctx, pointer, full.size, n_embd, 1, n_layer - 1) == 0
    model.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(model.ctx), True)  # no prefix reuse
    model.eval(ids)
    return np.array(model.scores[: len(ids)])


def hf_logits(model: torch.nn.Module, ids: list[int], additions: Mapping[int, object]) -> np.ndarray:
    """Every position's logits with ``additions[block]`` added to that decoder block's output."""

    def adding(delta: torch.Tensor) -> object:
        return lambda _module, _args, output: output + delta

    handles = [
        model.model.layers[block].register_forward_hook(adding(torch.as_tensor(np.asarray(vector))))
        for block, vector in additions.items()
    ]
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()
    finally:
        for handle in handles:
            handle.remove()


def tiny_variant(directory: Path, architecture: str, fields: Mapping[str, object]) -> Path:
    """testkit's tiny model of ``architecture`` with ``fields`` of its config changed (random weights)."""
    tokenizer = build_tokenizer()
    config = tiny_config(architecture, len(tokenizer))
    for name, value in fields.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    causal_lm_from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class Float16TableGelu(torch.nn.Module):
    """GELU as llama.cpp's CPU kernel computes it (``GGML_GELU_FP16``): the input, rounded to float16,
    indexes ggml's table of float16 values; 0 at -10 and below, the input itself at 10 and above. The
    table is ggml's own, filled once llama.cpp has made a CPU backend (load a model first), read from
    the copy of libggml-cpu that filled it (a wheel may ship the library twice, not as links)."""

    def __init__(self) -> None:
        super().__init__()
        tables = [
            np.frombuffer(
                (ctypes.c_uint16 * (1 << 16)).in_dll(ctypes.CDLL(str(path)), "ggml_table_gelu_f16"),
                np.float16,
            )
            for path in sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu.so*"))
        ]
        filled = [table for table in tables if table.any()]
        assert filled, "no filled GELU table: load a llama.cpp model first"
        self.table = torch.from_numpy(filled[0].astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        looked_up = self.table[x.half().view(torch.int16).long() & 0xFFFF]
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, looked_up))
