"""A small HF -> GGUF (F32) model writer for the decoder-only architectures llama.cpp shares with us:
llama, mistral and mixtral (as llama.cpp's LLAMA), qwen2, qwen3, qwen3_moe, phi3, olmo2, granite and
gpt_oss (per-family details in ``families.py``); ``NOT_CONVERTIBLE`` says why Gemma 2 and 3 are not.

It exists so that the GGUF backend can be tested against the HF backend on the very same weights
(the tiny test models, the demo models) without llama.cpp's own conversion script, which is not part
of any package. Real models come as GGUF files already; convert them with llama.cpp's
``convert_hf_to_gguf.py``. The `gguf` package provides the writer and the tensor-name tables.

These details make llama.cpp compute exactly what transformers computes:
- Llama-family q_proj/k_proj rows are permuted: HF rotates the two halves of each head
  ("rotate_half"), llama.cpp's Llama RoPE rotates adjacent pairs. Qwen2 uses NeoX-style RoPE in
  llama.cpp, which is HF's layout, so its weights go as they are.
- The byte-level BPE vocabulary is written with pre-tokenizer "gpt-2", which splits text as the
  GPT-2 regex of HF's ByteLevel pre-tokenizer does.
- llama.cpp gives a model whose ``general.name`` contains "phi3" or "phi-3" the quirks of Microsoft's
  Phi-3 vocabulary (whitespace stripped after special tokens, and a lookup of ``</s>`` that fails to
  load any other vocabulary), so such a name is written with the family spelt "phi_3".
  Phi-3's RoPE is NeoX-style in llama.cpp, and its fused qkv/gate_up weights go as they are.
- YaRN (GPT-OSS) is written as llama.cpp's scaling keys. llama.cpp rounds YaRN's correction range
  outwards, as transformers does with ``truncate`` true; released GPT-OSS says false, and there the
  two differ a little (the converter warns).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from server.engine.model_loading import load_causal_lm
from server.gguf.families import FAMILIES, Family, is_fused_expert, split_experts

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {name: family.arch for name, family in FAMILIES.items()}
PERMUTED_ROPE = {family.arch for family in FAMILIES.values() if family.permuted_rope}
# Model types llama.cpp cannot be made to compute as transformers does: type -> why.
_GELU_TABLE = (
    "llama.cpp's CPU GELU (Gemma's GeGLU) reads a float16 table, GGML_GELU_FP16: its logits differ from "
    "transformers' by about 1e-3, beyond the 1e-4 steering on GGUF is held to"
)
NOT_CONVERTIBLE: dict[str, str] = {
    "gemma2": _GELU_TABLE,
    "gemma3_text": _GELU_TABLE,
    "gemma3": _GELU_TABLE + " (Gemma 3's text stack; its vision tower would go in a separate mmproj file)",
}


class ConversionError(ValueError):
    """The model cannot be converted by this converter."""


def permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> llama.cpp's interleaved pairs, per head."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(model_dir: str | Path) -> str:
    return re.sub(r"phi-?3", "phi_3", Path(model_dir).name, flags=re.IGNORECASE)


def _write_rope(writer: gguf.GGUFWriter, config: Any) -> None:
    """RoPE's base and, for YaRN (GPT-OSS as released), its scaling, as llama.cpp reads them."""
    parameters = getattr(config, "rope_parameters", None) or {}
    parameters = parameters.get("full_attention", parameters)  # Gemma 3: per layer type
    rope_type = parameters.get("rope_type", "default")
    writer.add_rope_freq_base(float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope_type in ("default", None):
        return
    if rope_type != "yarn":
        raise ConversionError(f"rope scaling {rope_type!r} is not supported by this converter")
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(parameters["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(parameters["original_max_position_embeddings"]))
    writer.add_rope_scaling_yarn_beta_fast(float(parameters.get("beta_fast", 32.0)))
    writer.add_rope_scaling_yarn_beta_slow(float(parameters.get("beta_slow", 1.0)))
    if not parameters.get("truncate", True):
        # llama.cpp always rounds YaRN's correction range outwards; GPT-OSS as released does not, so
        # its logits on llama.cpp differ from transformers' a little (as with llama.cpp's own converter).
        logger.warning("YaRN with truncate=false: llama.cpp rounds the correction range; logits will differ")


def _merges(tokenizer: Any) -> list[str]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"only byte-level BPE tokenizers are supported, got {model.get('type')}")
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    tokens, types = [], []
    for index in range(vocab_size):  # the embedding may be larger than the vocabulary: pad it
        if index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _family(config: Any) -> Family:
    model_type = config.model_type
    if model_type in NOT_CONVERTIBLE:
        raise ConversionError(f"cannot convert model type {model_type!r}: {NOT_CONVERTIBLE[model_type]}")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConversionError(f"cannot convert model type {model_type!r}; supported: {sorted(FAMILIES)}")
    for check in family.checks:
        problem = check(config)
        if problem is not None:
            raise ConversionError(f"cannot convert this {model_type} model: {problem}")
    return family


def _write_metadata(writer: gguf.GGUFWriter, config: Any, family: Family, vocab_size: int) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    _write_rope(writer, config)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(vocab_size)
    family.metadata(writer, config)


def _tensors(model: Any, config: Any, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, data) of every tensor, in llama.cpp's layout."""
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight" and not family.needs_output:
            continue  # llama.cpp falls back to token_embd for the output projection
        data = tensor.detach().to(torch.float32).numpy()
        parts = split_experts(hf_name, data, family) if is_fused_expert(hf_name) else [(hf_name, data)]
        for part_name, part in parts:
            yield _gguf_tensor_name(names, part_name), _layout(part_name, part, config, family)


def _gguf_tensor_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    if hf_name == "lm_head.weight":
        return "output.weight"  # some maps (Gemma 2) know only a tied output
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ConversionError(f"no GGUF name for tensor {hf_name!r}")
    return name + ".weight" if name.endswith("attn_sinks") else name


def _layout(hf_name: str, data: np.ndarray, config: Any, family: Family) -> np.ndarray:
    if family.permuted_rope and hf_name.endswith("q_proj.weight"):
        data = permute_rope_rows(data, config.num_attention_heads)
    elif family.permuted_rope and hf_name.endswith("k_proj.weight"):
        data = permute_rope_rows(data, config.num_key_value_heads)
    elif family.norm_plus_one and hf_name.endswith("norm.weight"):
        data = data + 1.0
    return np.ascontiguousarray(data)


def convert_hf_to_gguf(model_dir: str | Path, output: str | Path) -> Path:
    """Write ``model_dir`` (a local HF checkpoint) to ``output`` as an F32 GGUF model."""
    config = AutoConfig.from_pretrained(model_dir)
    family = _family(config)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    output = Path(output)
    writer = gguf.GGUFWriter(str(output), gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_name(_gguf_name(model_dir))
    vocab_size = model.get_input_embeddings().weight.shape[0]
    _write_metadata(writer, config, family, vocab_size)
    _write_tokenizer(writer, tokenizer, vocab_size)
    for name, data in _tensors(model, config, family):
        writer.add_tensor(name, data)
    write_file(writer)
    return output


def write_file(writer: gguf.GGUFWriter) -> None:
    """Header, key-value data and tensors, in the order GGUF lays them out; then close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
