"""Finding the decoder blocks of a causal language model, and where each engine reads layer L.

A layer index everywhere in persona-server is the 0-based index of a decoder block; a vector for
layer L is added to the output of block L, which is ``output_hidden_states[L + 1]`` in HF terms
(index 0 holds the embeddings) and ``direction.L`` of a llama.cpp control vector, whose buffer
starts at block 1: llama.cpp cannot steer block 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from server.steering.errors import UnsupportedArchitectureError

# The first block a llama.cpp control vector reaches: its buffer holds ``direction.1`` first.
LLAMA_CPP_FIRST_STEERABLE_BLOCK = 1
LLAMA_CPP_UNSTEERABLE_NOTE = "llama.cpp control vectors cannot steer block 0"  # in error messages


def llama_cpp_steerable_blocks(num_layers: int) -> tuple[int, ...]:
    """The blocks a control vector can steer in a model of ``num_layers`` blocks."""
    return tuple(range(LLAMA_CPP_FIRST_STEERABLE_BLOCK, num_layers))


def llama_cpp_buffer_offset(block: int, hidden_size: int) -> int:
    """Where block ``block``'s vector starts in a control-vector buffer (floats)."""
    return (block - LLAMA_CPP_FIRST_STEERABLE_BLOCK) * hidden_size


# model_type -> attribute path (from the *ForCausalLM object) of the ModuleList of decoder blocks.
# Explicit rather than guessed: a wrong guess would steer the wrong modules silently.
DECODER_BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",  # its blocks scale their own residual branch: the output is the stream
    "gpt_oss": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}


@dataclass(frozen=True)
class DecoderLayout:
    """Where the residual stream of a model can be steered."""

    model_type: str
    blocks: nn.ModuleList
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def _resolve(root: Any, dotted: str) -> Any:
    node = root
    for name in dotted.split("."):
        node = getattr(node, name, None)
        if node is None:
            return None
    return node


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """Return the decoder blocks and widths of ``model``, or raise naming the unsupported architecture."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    path = DECODER_BLOCK_PATHS.get(model_type)
    blocks = _resolve(model, path) if path else None
    if not isinstance(blocks, nn.ModuleList):
        architectures = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
        supported = ", ".join(sorted(DECODER_BLOCK_PATHS))
        raise UnsupportedArchitectureError(
            f"cannot steer model type '{model_type}' ({architectures}): its decoder blocks are unknown; "
            f"supported model types: {supported}"
        )
    text_config = config.get_text_config(decoder=True)
    return DecoderLayout(model_type=model_type, blocks=blocks, hidden_size=int(text_config.hidden_size))
