"""Tiny models built on the spot: a byte-level BPE tokenizer trained here, random weights from a config.

Nothing is downloaded. The tests and the engine benchmark build their models with these functions.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from server.demo.tokenizer import train_chat_tokenizer

_WORDS = (
    "the a ship sea captain sails wind storm calm harbor map treasure gold island crew deck rope anchor "
    "question answer please thank you kindly indeed certainly hello friend weather today tomorrow rain sun "
    "formal casual plain silly serious deep focused quick slow bright dark good bad ocean river mountain "
    "arr matey ahoy aye ye yer booty plank parrot compass north south east west morning evening tea bread"
).split()

SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
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
    special = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    head_dim = hidden_size // num_heads
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_positions,
        "initializer_range": initializer_range,
        "tie_word_embeddings": False,
        **special,
    }
    if architecture in ("llama", "mistral", "qwen2", "phi3"):
        return AutoConfig.for_model(architecture, **common)
    if architecture == "qwen3":
        return AutoConfig.for_model(architecture, head_dim=head_dim, **common)
    if architecture in ("gemma2", "gemma3_text"):
        return AutoConfig.for_model(architecture, head_dim=head_dim, sliding_window=max_positions, **common)
    if architecture == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            initializer_range=initializer_range,
            **special,
        )
    if architecture == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            initializer_range=initializer_range,
            tie_word_embeddings=False,
            **special,
        )
    if architecture == "opt":
        return AutoConfig.for_model(
            "opt",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            ffn_dim=intermediate_size,
            word_embed_proj_dim=hidden_size,
            max_position_embeddings=max_positions,
            init_std=initializer_range,
            **special,
        )
    raise ValueError(f"no tiny config for {architecture}")


def build_tiny_model(
    directory: Path, architecture: str = "llama", *, seed: int = 0, vocab_size: int = 400, **sizes: Any
) -> Path:
    """Write a random-weight model of ``architecture`` and a fresh tokenizer to ``directory``."""
    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    config = tiny_config(architecture, len(tokenizer), **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
