from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from server.steering.errors import UnsupportedArchitectureError
from server.steering.layers import find_decoder_layout
from testkit.tiny_models import SUPPORTED_ARCHITECTURES


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_finds_every_decoder_block(architecture: str, tiny_model_dir: Callable[[str], Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(architecture))
    layout = find_decoder_layout(model)
    assert layout.num_layers == 3
    assert layout.hidden_size == 64
    assert layout.model_type == architecture

    # Each block found must be the one whose output HF reports as hidden_states[L + 1].
    input_ids = torch.tensor([[5, 17, 42, 9]])
    captured: list[torch.Tensor] = []
    handle = layout.blocks[1].register_forward_hook(
        lambda _m, _a, out: captured.append((out if isinstance(out, torch.Tensor) else out[0]).detach())
    )
    with torch.no_grad():
        hidden_states = model(input_ids, output_hidden_states=True).hidden_states
    handle.remove()
    assert torch.equal(captured[0], hidden_states[2])


def test_unsupported_architecture_is_named() -> None:
    config = AutoConfig.for_model(
        "falcon", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="falcon"):
        find_decoder_layout(model)
