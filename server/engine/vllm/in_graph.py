"""Steering and reading inside vLLM's compiled model: persistent buffers and the per-block arithmetic
that reads them (docs/design.md, "Steering inside vLLM's compiled graph").

vLLM compiles each model's forward (``torch.compile``; on CUDA also CUDA graphs), and code that runs
in Python beside a compiled forward, such as a forward hook registered after start-up, is skipped.
So the steering lives in the traced forward itself: a forward hook on every decoder block is
registered when the model is loaded (``steered_loader.py``), before vLLM first traces it, and does
only tensor arithmetic on buffers whose addresses never change:

- ``tables[block, slot]``: what slot ``slot`` adds to block ``block``'s output (slot 0: zeros);
- ``token_slot[t]``, ``token_scale[t]``: the slot token ``t`` of the flat batch reads and its scale;
- ``token_read[t]``: the row of ``reads`` that block outputs at token ``t`` are summed into (row 0:
  the discard row); ``reads[block, row]`` accumulates them, in float32;
- ``edit_units[block, slot]`` and ``edit_params[block, slot]`` (alpha, low, high), ``token_edit[t]``:
  the one edit (ablate or cap, server/steering/operators.py) token ``t`` applies after the
  additions, along a unit direction (slot 0: a zero direction and zero parameters, which change
  nothing: the projection is 0 and stays 0).

The worker fills the token buffers before each forward, outside the compiled region, and takes the
reads out after it (``worker_steering.py``). A batch with nothing steered adds exact zeros.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SteeringBuffers(nn.Module):
    """The buffers a model's steered forward reads, and the per-block step it traces."""

    def __init__(
        self, num_blocks: int, hidden: int, slots: int, max_tokens: int, read_rows: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.num_slots = slots
        self.max_tokens = max_tokens
        self.num_read_rows = read_rows
        self.owned_layers: tuple[int, ...] = ()  # the blocks hooked in this worker (its pipeline stage)
        tables = torch.zeros(num_blocks, slots + 1, hidden, dtype=dtype)
        self.register_buffer("tables", tables, persistent=False)
        self.register_buffer("token_slot", torch.zeros(max_tokens, dtype=torch.long), persistent=False)
        self.register_buffer("token_scale", torch.zeros(max_tokens, dtype=torch.float32), persistent=False)
        self.register_buffer("token_read", torch.zeros(max_tokens, dtype=torch.long), persistent=False)
        self.register_buffer(
            "reads", torch.zeros(num_blocks, read_rows + 1, hidden, dtype=torch.float32), persistent=False
        )
        edit_units = torch.zeros(num_blocks, slots + 1, hidden, dtype=torch.float32)
        self.register_buffer("edit_units", edit_units, persistent=False)
        self.register_buffer("edit_params", torch.zeros(num_blocks, slots + 1, 3), persistent=False)
        self.register_buffer("token_edit", torch.zeros(max_tokens, dtype=torch.long), persistent=False)

    def step(self, block: int, output: Any) -> Any:
        """Block ``block``'s output with its steering added; the residual stream after it summed into
        the read rows. vLLM's Llama-family blocks return ``(hidden, residual)`` and the stream is their
        sum (the next block's fused add and norm adds them), so adding to ``hidden`` steers it; blocks
        that return the stream itself (OLMo 2, Granite, transformers' blocks) return one tensor, or a
        tuple whose second part is no tensor."""
        split = isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor)
        hidden = output[0] if isinstance(output, tuple) else output
        # vLLM's own models pass the flat batch as (tokens, hidden); its Transformers backend runs
        # transformers' blocks on (1, tokens, hidden). Either way the tokens are the flat batch's.
        flat = hidden.reshape(-1, hidden.shape[-1])
        count = flat.shape[0]
        added = self.token_scale[:count, None] * self.tables[block].index_select(0, self.token_slot[:count])
        flat = flat + added.to(flat.dtype)
        residual = output[1].reshape(flat.shape) if split else None
        flat = flat + self._edit(block, flat if residual is None else flat + residual, count).to(flat.dtype)
        stream = flat + residual if residual is not None else flat
        self.reads[block].index_add_(0, self.token_read[:count], stream.float())
        hidden = flat.reshape(hidden.shape)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _edit(self, block: int, stream: torch.Tensor, count: int) -> torch.Tensor:
        """What each token's edit changes in the stream (float32 [count, hidden]; zeros for tokens
        of slot 0): the projection p on the unit direction becomes clamp((1 - alpha) p, low, high)."""
        slot = self.token_edit[:count]
        units = self.edit_units[block].index_select(0, slot)
        alpha, low, high = self.edit_params[block].index_select(0, slot).unbind(-1)
        projection = (stream.float() * units).sum(-1)
        wanted = torch.minimum(torch.maximum((1 - alpha) * projection, low), high)
        return (wanted - projection).unsqueeze(-1) * units


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a vLLM causal LM (``model.model.layers``)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None:
        raise RuntimeError(f"{type(model).__name__}: no model.layers to steer")
    return blocks


def install(model: nn.Module, buffers: SteeringBuffers) -> list[int]:
    """Attach ``buffers`` to ``model`` and hook every block this worker owns; returns those blocks.
    Must run before vLLM first traces the model (the hooks are traced into the compiled forward)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    model.persona_steering = buffers  # type: ignore[assignment]  # found again by the worker
    owned = []
    for index, block in enumerate(decoder_blocks(model)):
        if isinstance(block, PPMissingLayer):
            continue
        block.register_forward_hook(_hook(buffers, index))
        owned.append(index)
    buffers.owned_layers = tuple(owned)
    return owned


def _hook(buffers: SteeringBuffers, index: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return buffers.step(index, output)

    return hook


def buffers_of(model: nn.Module) -> SteeringBuffers | None:
    return getattr(model, "persona_steering", None)
