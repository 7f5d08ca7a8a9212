"""Training the demo chat models from scratch on the synthetic corpus, on CPU."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerFast

from server.demo.corpus import Conversation, generate_corpus
from server.demo.tokenizer import train_chat_tokenizer
from server.engine.model_loading import causal_lm_from_config


@dataclass(frozen=True)
class DemoSpec:
    """One demo model: architecture, widths and seed (the demos differ in all of them)."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    seed: int
    corpus_size: int = 24_000
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 3e-3
    config_extras: dict[str, Any] = field(default_factory=dict)  # family-specific config fields


MAX_POSITIONS = 256
# Phi-3's default original context (4096 tokens, a bound of its rope scaling) made the demos' context.
PHI3_CONTEXT = {"original_max_position_embeddings": MAX_POSITIONS}
# GPT-OSS's shape at demo scale: four experts, two per token, sliding and full layers in turn,
# attention sinks, YaRN (its correction range rounded, as llama.cpp computes it: docs/architectures.md).
GPT_OSS_SHAPE = {
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "head_dim": 32,
    "sliding_window": 64,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": MAX_POSITIONS // 4,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": True,
    },
}
DEMO_SPECS = {
    spec.name: spec
    for spec in [
        DemoSpec("demo-llama", "llama", 128, 4, 4, 4, 384, vocab_size=1024, seed=1),
        DemoSpec("demo-qwen", "qwen2", 96, 4, 4, 2, 288, vocab_size=900, seed=2),
        # Head dim 32, the smallest vLLM's CPU attention serves.
        DemoSpec("demo-phi3", "phi3", 192, 6, 6, 3, 576, vocab_size=1200, seed=3, config_extras=PHI3_CONTEXT),
        # Not served in demo mode: the target of the seed scenario (docs/seed-scenario.md).
        DemoSpec(
            "demo-gpt-oss", "gpt_oss", 128, 4, 4, 2, 256, vocab_size=1000, seed=4, config_extras=GPT_OSS_SHAPE
        ),
    ]
}


def build_model(spec: DemoSpec, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    config = AutoConfig.for_model(
        spec.architecture,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec.config_extras,
    )
    torch.manual_seed(spec.seed)
    return causal_lm_from_config(config, dtype=torch.float32)


def encode(conversation: Conversation, tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, and labels that train on the answer (and its end) only."""
    question = conversation.messages(with_answer=False)
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(conversation.messages(), tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
    return ids, labels


def _batches(examples: list[tuple[list[int], list[int]]], spec: DemoSpec, pad_id: int) -> torch.Tensor:
    rng = random.Random(spec.seed)
    while True:
        batch = rng.sample(examples, spec.batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((spec.batch_size, width), pad_id)
        labels = torch.full((spec.batch_size, width), -100)
        mask = torch.zeros((spec.batch_size, width), dtype=torch.long)
        for row, (tokens, targets) in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(targets)] = torch.tensor(targets)
            mask[row, : len(tokens)] = 1
        yield ids, labels, mask


def train_demo(
    spec: DemoSpec, out_dir: Path, progress: Callable[[int, float], None] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Train tokenizer and model of ``spec`` and save both (safetensors) to ``out_dir``."""
    corpus = generate_corpus(spec.corpus_size, seed=spec.seed)
    texts = [f"{c.system}\n{c.question}\n{c.answer}" for c in corpus]
    tokenizer = train_chat_tokenizer(texts, spec.vocab_size)
    model = build_model(spec, tokenizer)
    examples = [encode(conversation, tokenizer) for conversation in corpus]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=0.01, betas=(0.9, 0.98)
    )
    warmup = max(1, spec.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    batches = _batches(examples, spec, tokenizer.pad_token_id)
    for step in range(spec.steps):
        ids, labels, mask = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(step, float(loss))
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer
