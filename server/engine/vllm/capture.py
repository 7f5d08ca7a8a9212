"""Reading block outputs inside a vLLM worker for read-backs (monitoring, extraction, mapping fits).

A read-back is an unsteered request whose prompt is the text to read; its prompt may be prefilled in
several forwards (chunked prefill), so sums accumulate per block until the front end takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from server.engine.vllm.wire import pack


@dataclass
class CaptureState:
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float64 [hidden]
    counts: dict[int, int] = field(default_factory=dict)
    last: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [hidden]


@dataclass(frozen=True)
class StepCapture:
    """One read-back request's rows in a forward."""

    token: str
    num_blocks: int
    rows: torch.Tensor  # flat rows whose outputs are summed
    last_row: int | None  # flat row of the last prompt token, when it is in this forward


class WorkerCaptures:
    def __init__(self) -> None:
        self._states: dict[str, CaptureState] = {}

    def record(self, layer: int, outputs: torch.Tensor, captures: list[StepCapture]) -> None:
        """Add block ``layer``'s outputs [tokens, hidden] (the residual stream) of each capture's rows."""
        for capture in captures:
            if layer >= capture.num_blocks:
                continue
            state = self._states.setdefault(capture.token, CaptureState())
            picked = outputs.index_select(0, capture.rows.to(outputs.device)).double().sum(0).cpu()
            state.sums[layer] = state.sums[layer] + picked if layer in state.sums else picked
            state.counts[layer] = state.counts.get(layer, 0) + int(capture.rows.numel())
            if capture.last_row is not None:
                state.last[layer] = outputs[capture.last_row].float().cpu()

    def take(self, token: str) -> dict[str, Any] | None:
        state = self._states.pop(token, None)
        if state is None:
            return None
        return {
            "sums": {layer: pack(tensor.numpy().astype(np.float64)) for layer, tensor in state.sums.items()},
            "counts": dict(state.counts),
            "last": {layer: pack(tensor.numpy().astype(np.float32)) for layer, tensor in state.last.items()},
        }
