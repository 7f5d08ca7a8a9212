"""Tiny models built on the spot: a byte-level BPE tokenizer trained here, random weights from a config.

Nothing is downloaded. The tests and the benchmarks build their models with these functions.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedTokenizerFast

from server.demo.tokenizer import train_chat_tokenizer
from server.engine.model_loading import causal_lm_from_config

_WORDS = (
    "the a ship sea captain sails wind storm calm harbor map treasure gold island crew deck rope anchor "
    "question answer please thank you kindly indeed certainly hello friend weather today tomorrow rain sun "
    "formal casual plain silly serious deep focused quick slow bright dark good bad ocean river mountain "
    "arr matey ahoy aye ye yer booty plank parrot compass north south east west morning evening tea bread"
).split()

SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "olmo2",
    "granite",
    "gpt_oss",
    "gpt2",
    "gpt_neox",
    "opt",
)


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def build_tokenizer(vocab_size: int = 400, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens trained on a generated corpus."""
    return train_chat_tokenizer(_corpus(seed), vocab_size)


# How each family's config names the shared knobs: hidden, intermediate, blocks, heads, positions, init.
_LLAMA_NAMES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "initializer_range",
)
_OPT_NAMES = (
    "hidden_size",
    "ffn_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "init_std",
)
_KNOB_NAMES = {
    "gpt2": ("n_embd", "n_inner", "n_layer", "n_head", "n_positions", "initializer_range"),
    "gpt_neox": _LLAMA_NAMES,
    "opt": _OPT_NAMES,
}
_SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}


def _family_fields(
    architecture: str, hidden_size: int, num_heads: int, num_kv_heads: int, max_positions: int
) -> dict[str, Any]:
    """What a family needs beyond the shared knobs (GPT-2 and OPT keep their tied embeddings)."""
    if architecture == "gpt2":
        return {}
    if architecture == "gpt_neox":
        return {"tie_word_embeddings": False}
    if architecture == "opt":
        return {"word_embed_proj_dim": hidden_size}
    fields: dict[str, Any] = {"num_key_value_heads": num_kv_heads, "tie_word_embeddings": False}
    if architecture in ("qwen3", "qwen3_moe", "gemma2", "gemma3_text", "gpt_oss"):
        fields["head_dim"] = hidden_size // num_heads
    if architecture in ("gemma2", "gemma3_text", "gpt_oss"):
        fields["sliding_window"] = max_positions
    if architecture in ("gemma2", "gemma3_text"):
        fields["tie_word_embeddings"] = True  # as every released Gemma (vLLM's Gemma 2 has no lm_head)
    return {**fields, **_MIXTURE_FIELDS.get(architecture, {})}


# Mixtures of experts: four experts, two per token, every block sparse. Granite's multipliers are set
# away from 1 so that a steering test sees its scaled residual, embeddings and logits.
_MIXTURE_FIELDS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    # GPT-OSS: YaRN as released (factor 32 over 4,096 positions), scaled down to a 1,024-position toy,
    # with its correction range rounded ("truncate"), as llama.cpp computes YaRN; the released config
    # says false, which llama.cpp cannot follow (tests/test_gguf_backend.py measures the difference).
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": True,
        },
    },
    "granite": {
        "residual_multiplier": 0.5,
        "embedding_multiplier": 2.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 2.0,
    },
}


# Gemma 3's SigLIP vision tower, as small as it goes: one block, 32 wide, 4 patches of 16 pixels.
_TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 16,
}


def tiny_config(
    architecture: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    initializer_range: float = 0.1,
) -> Any:
    """A random-weight config of ``architecture`` small enough for a unit test."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"no tiny config for {architecture}")
    if architecture == "gemma3":  # Gemma 3 with its vision tower: the text stack is gemma3_text's
        text = tiny_config(
            "gemma3_text",
            vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_positions=max_positions,
            initializer_range=initializer_range,
        )
        return AutoConfig.for_model(
            "gemma3",
            text_config=text.to_dict(),
            vision_config=_TINY_VISION,
            mm_tokens_per_image=4,
            # The image tokens are the tokenizer's last ids: a text prompt never holds them.
            boi_token_index=vocab_size - 3,
            eoi_token_index=vocab_size - 2,
            image_token_index=vocab_size - 1,
            initializer_range=initializer_range,
            **_SPECIAL_IDS,
        )
    names = _KNOB_NAMES.get(architecture, _LLAMA_NAMES)
    knobs = (hidden_size, intermediate_size, num_layers, num_heads, max_positions, initializer_range)
    fields = {
        "vocab_size": vocab_size,
        **dict(zip(names, knobs, strict=True)),
        **_family_fields(architecture, hidden_size, num_heads, num_kv_heads, max_positions),
        **_SPECIAL_IDS,
    }
    return AutoConfig.for_model(architecture, **fields)


def build_tiny_model(
    directory: Path, architecture: str = "llama", *, seed: int = 0, vocab_size: int = 400, **sizes: Any
) -> Path:
    """Write a random-weight model of ``architecture`` and a fresh tokenizer to ``directory``."""
    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    config = tiny_config(architecture, len(tokenizer), **sizes)
    torch.manual_seed(seed)
    model = causal_lm_from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
