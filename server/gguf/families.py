"""What each model family needs, beyond the shared Llama-like layout, for llama.cpp to compute what
transformers computes: its GGUF architecture, extra metadata, and how its tensors are laid out.

- Llama-style RoPE (llama, mistral, mixtral, granite) rotates adjacent pairs in llama.cpp, so q/k rows
  are permuted from HF's half-split layout; every other family here is NeoX-style, HF's own layout.
- Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp multiplies by the weight, so 1 is added.
- transformers holds a mixture's experts fused (``experts.gate_up_proj``, ``experts.down_proj``);
  llama.cpp wants ``ffn_{gate,up,down}_exps`` stacked per expert, split here.
  GPT-OSS keeps its experts transposed, gate and up interleaved column by column, with biases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

Checker = Callable[[Any], str | None]
Metadata = Callable[[gguf.GGUFWriter, Any], None]


def _no_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    return None


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    permuted_rope: bool = False  # Llama-style RoPE: q/k rows to adjacent pairs
    norm_plus_one: bool = False  # Gemma: HF's RMSNorm scales by 1 + weight
    # llama.cpp loads this family only with an output tensor, even where it is the embedding (tied).
    needs_output: bool = False
    metadata: Metadata = _no_metadata
    checks: tuple[Checker, ...] = field(default=())


def _experts(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)


def _qwen3_moe(writer: gguf.GGUFWriter, config: Any) -> None:
    _experts(writer, config)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _granite(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_attention_scale(config.attention_multiplier)
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_logit_scale(config.logits_scaling)


def _gemma(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_sliding_window(config.sliding_window)
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if local is not None:
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def _gpt_oss(writer: gguf.GGUFWriter, config: Any) -> None:
    _experts(writer, config)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_sliding_window(config.sliding_window)


def _normalized_top_k(config: Any) -> str | None:
    if config.norm_topk_prob:
        return None
    return (
        "norm_topk_prob is false, and llama.cpp's Qwen3-MoE always renormalises the chosen experts' weights"
    )


def _gemma_scale(blocks_of_27b: int) -> Checker:
    """llama.cpp scales a Gemma query by 1/sqrt(head_dim), a 27B's (known by its block count) by
    1/sqrt(hidden/heads); transformers by 1/sqrt(query_pre_attn_scalar)."""

    def check(config: Any) -> str | None:
        wide = config.num_hidden_layers == blocks_of_27b
        scalar = config.hidden_size // config.num_attention_heads if wide else config.head_dim
        if config.query_pre_attn_scalar == scalar:
            return None
        scaled = config.query_pre_attn_scalar
        return f"query_pre_attn_scalar is {scaled}; llama.cpp scales the queries as if it were {scalar}"

    return check


def _tied_output(config: Any) -> str | None:
    if config.tie_word_embeddings:
        return None
    return "its output projection is not its embedding, and llama.cpp's Gemma 2 reads no output tensor"


def _sliding_every(period: int) -> Checker:
    """llama.cpp slides the window in every layer but each ``period``-th (its fixed pattern)."""

    def check(config: Any) -> str | None:
        expected = [
            "full_attention" if (index + 1) % period == 0 else "sliding_attention"
            for index in range(config.num_hidden_layers)
        ]
        types = getattr(config, "layer_types", None) or expected
        if list(types) == expected:
            return None
        return f"layer types {list(types)} differ from llama.cpp's fixed pattern {expected}"

    return check


def _gpt_oss_activation(config: Any) -> str | None:
    if (config.swiglu_alpha, config.swiglu_limit) == (1.702, 7.0):
        return None
    return "llama.cpp's GPT-OSS activation is fixed at alpha 1.702, limit 7.0"


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permuted_rope=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permuted_rope=True),
    "mixtral": Family(gguf.MODEL_ARCH.LLAMA, permuted_rope=True, metadata=_experts),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3),
    "qwen3_moe": Family(gguf.MODEL_ARCH.QWEN3MOE, metadata=_qwen3_moe, checks=(_normalized_top_k,)),
    "phi3": Family(gguf.MODEL_ARCH.PHI3),
    "granite": Family(gguf.MODEL_ARCH.GRANITE, permuted_rope=True, metadata=_granite),
    "olmo2": Family(gguf.MODEL_ARCH.OLMO2, needs_output=True),
    "gemma2": Family(
        gguf.MODEL_ARCH.GEMMA2,
        norm_plus_one=True,
        metadata=_gemma,
        checks=(_gemma_scale(46), _sliding_every(2), _tied_output),
    ),
    "gemma3_text": Family(
        gguf.MODEL_ARCH.GEMMA3,
        norm_plus_one=True,
        metadata=_gemma,
        checks=(_gemma_scale(62), _sliding_every(6)),
    ),
    "gpt_oss": Family(
        gguf.MODEL_ARCH.GPT_OSS,
        needs_output=True,
        metadata=_gpt_oss,
        checks=(_sliding_every(2), _gpt_oss_activation),
    ),
}


def split_experts(hf_name: str, data: np.ndarray, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """A fused expert tensor -> per-kind stacked tensors under names the GGUF tensor map knows."""
    stem = hf_name.rsplit(".", 1)[0] + "."  # "model.layers.N.mlp.experts."
    if family.arch == gguf.MODEL_ARCH.GPT_OSS:  # [experts, in, out], gate/up interleaved
        if hf_name.endswith("gate_up_proj"):
            yield stem + "gate_proj.weight", data[:, :, ::2].transpose(0, 2, 1)
            yield stem + "up_proj.weight", data[:, :, 1::2].transpose(0, 2, 1)
        elif hf_name.endswith("gate_up_proj_bias"):
            yield stem + "gate_proj.bias", data[:, ::2]
            yield stem + "up_proj.bias", data[:, 1::2]
        elif hf_name.endswith("down_proj"):
            yield stem + "down_proj.weight", data.transpose(0, 2, 1)
        else:
            yield stem + "down_proj.bias", data
    elif hf_name.endswith("gate_up_proj"):  # [experts, 2 * ff, hidden]: gate rows, then up rows
        half = data.shape[1] // 2
        yield stem + "gate_proj.weight", data[:, :half]
        yield stem + "up_proj.weight", data[:, half:]
    else:
        yield stem + "down_proj.weight", data


def is_fused_expert(hf_name: str) -> bool:
    return ".experts." in hf_name and hf_name.rsplit(".", 1)[1] in (
        "gate_up_proj",
        "gate_up_proj_bias",
        "down_proj",
        "down_proj_bias",
    )
