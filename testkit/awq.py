"""A 4-bit AWQ checkpoint written from a float model by round-to-nearest, in AutoAWQ's GEMM layout,
for the tests of vLLM's quantized path: users serve AWQ checkpoints made by AutoAWQ or llm-compressor
(an activation-aware search chooses their scales); the layout vLLM reads is the same, and the tests
need the layout, not the search.

Each linear weight ``W`` [out, in] of the decoder blocks becomes, per group of ``group_size`` input
rows, a scale and a zero point (``W.T ~ (q - zero) * scale``, ``q`` in 0..15), packed eight 4-bit
values to an int32 in AWQ's interleaved order. The float model with exactly the dequantized weights is
written beside it: the reference the quantized engine is compared with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.engine.model_loading import load_causal_lm

BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # which of eight columns goes to each nibble, low to high
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in 0..15 -> [rows, cols / 8] int32, AWQ's nibble order."""
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    packed = (grouped << shifts).sum(dim=-1)
    return (packed & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (q [in, out] ints, zeros [in / group, out] ints, scales [in / group, out])
    with the zero point and scale of each group from its range (round to nearest)."""
    columns = weight.t().float()  # [in, out]
    groups = columns.reshape(-1, group_size, columns.shape[1])
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    scales = ((high - low) / (2**BITS - 1)).clamp(min=1e-8).half().float()  # stored in float16
    zeros = torch.round(-low / scales).clamp(0, 2**BITS - 1)
    q = torch.round(groups / scales[:, None] + zeros[:, None]).clamp(0, 2**BITS - 1)
    return q.reshape(columns.shape), zeros, scales


def write_awq_checkpoint(model_dir: Path, out_dir: Path, reference_dir: Path, group_size: int = 32) -> None:
    """``model_dir`` as an AWQ checkpoint in ``out_dir``, and as the float model of its dequantized
    weights in ``reference_dir`` (same config and tokenizer otherwise)."""
    model = load_causal_lm(model_dir, dtype=torch.float32)
    quantized: dict[str, torch.Tensor] = {}
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for name, tensor in list(state.items()):
        stem = name.removesuffix(".weight")
        if not (name.endswith(".weight") and stem.rsplit(".", 1)[-1] in QUANTIZED):
            quantized[name] = tensor.contiguous()
            continue
        q, zeros, scales = quantize(tensor, group_size)
        quantized[f"{stem}.qweight"] = _pack(q)
        quantized[f"{stem}.qzeros"] = _pack(zeros)
        quantized[f"{stem}.scales"] = scales.half()
        groups = q.reshape(-1, group_size, q.shape[1])
        dequantized = ((groups - zeros[:, None]) * scales[:, None]).reshape(q.shape)
        state[name] = dequantized.t().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        quantized.pop("lm_head.weight", None)
    for directory in (out_dir, reference_dir):
        shutil.copytree(model_dir, directory, dirs_exist_ok=True)
        (directory / "model.safetensors").unlink()
    save_file(quantized, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.load_state_dict(state)
    model.save_pretrained(reference_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
