"""A peft LoRA adapter written as a llama.cpp GGUF LoRA adapter (F32): how a baked persona's adapter
reaches llama.cpp (``--lora``) beside the base model's GGUF (``model.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from transformers import AutoConfig

from server.gguf.model import ARCHITECTURES, PERMUTED_ROPE, ConversionError, permute_rope_rows, write_file

# peft names a LoRA pair after the weight it adapts: PREFIX + <HF weight name without .weight> + SUFFIX.
_PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"}


def convert_lora_to_gguf(adapter_dir: str | Path, base_model_dir: str | Path, output: str | Path) -> Path:
    """Write a peft LoRA adapter of ``base_model_dir`` as a llama.cpp GGUF LoRA adapter (F32).

    llama.cpp names each pair after the base tensor (``blk.0.attn_q.weight.lora_a`` [r, in] and
    ``...lora_b`` [out, r]) and scales B @ A by ``adapter.lora.alpha / r``, as peft does. B's rows
    of Llama q/k projections get the same RoPE permutation as the base weights' rows.
    """
    from safetensors.numpy import load_file

    config = AutoConfig.from_pretrained(base_model_dir)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ConversionError(f"cannot convert adapters of model type {config.model_type!r}")
    adapter = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    writer = gguf.GGUFWriter(str(output), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter["lora_alpha"]))
    for key, data in sorted(tensors.items()):
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PEFT_PREFIX):
            raise ConversionError(f"not a LoRA tensor of peft's layout: {key!r}")
        hf_weight = key.removeprefix(_PEFT_PREFIX).removesuffix(suffix) + ".weight"
        name = names.get_name(hf_weight, try_suffixes=(".weight",))
        if name is None:
            raise ConversionError(f"no GGUF name for the adapted tensor {hf_weight!r}")
        projection = hf_weight.rsplit(".", 2)[-2]
        if arch in PERMUTED_ROPE and projection in heads and _LORA_SUFFIXES[suffix] == "lora_b":
            data = permute_rope_rows(data, heads[projection])
        writer.add_tensor(f"{name}.{_LORA_SUFFIXES[suffix]}", np.ascontiguousarray(data, dtype=np.float32))
    write_file(writer)
    return Path(output)
