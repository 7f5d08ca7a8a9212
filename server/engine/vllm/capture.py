"""Reading block outputs inside a vLLM worker: read-backs (monitoring, extraction, mapping fits) and
answers monitored while they are generated.

A read-back is an unsteered request whose prompt is the text to read; its prompt may be prefilled in
several forwards (chunked prefill), so sums accumulate per block until the front end takes them.

An answer monitored in flight sums its response positions as they are fed back. vLLM may run a few
steps past the answer's end (the front end applies stop strings and aborts after), so such a capture
keeps the last ``TAIL`` positions' outputs apart too, and the front end cuts the sums at the answer's
end when it takes them; a position fed twice (a preempted request recomputed) spoils the capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from server.engine.vllm.wire import pack

# Positions an in-flight capture keeps apart: more than vLLM runs past an answer's end before the
# abort arrives (a step or two with asynchronous scheduling).
TAIL = 8


@dataclass
class CaptureState:
    sums: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> float64 [hidden]
    counts: dict[int, int] = field(default_factory=dict)
    last: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> float32 [hidden]
    tail: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # position -> layer -> float64
    positions: set[int] = field(default_factory=set)  # positions summed (in-flight captures)
    spoiled: bool = False

    def cut(self, end: int) -> bool:
        """Take positions ``end`` and later out of the sums; False when some are no longer apart."""
        late = sorted(position for position in self.positions if position >= end)
        if any(position not in self.tail for position in late):
            return False
        for position in late:
            for layer, output in self.tail[position].items():
                self.sums[layer] = self.sums[layer] - output
                self.counts[layer] -= 1
            self.positions.discard(position)
        return True

    def fed(self, positions: tuple[int, ...]) -> None:
        """An in-flight capture's positions in a forward: a position fed again spoils the sums, and
        positions fall out of the tail as newer ones come."""
        if not positions:
            return
        if self.positions.intersection(positions):
            self.spoiled = True
        self.positions.update(positions)
        oldest_kept = max(self.positions) - TAIL + 1
        for position in [p for p in self.tail if p < oldest_kept]:
            del self.tail[position]


@dataclass(frozen=True)
class StepCapture:
    """One capture's rows in a forward."""

    token: str
    num_blocks: int
    rows: torch.Tensor  # flat rows whose outputs are summed
    last_row: int | None  # flat row of the last prompt token, when it is in this forward
    positions: tuple[int, ...] | None = None  # the rows' positions, for an in-flight capture


class WorkerCaptures:
    def __init__(self) -> None:
        self._states: dict[str, CaptureState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def begin(self, captures: list[StepCapture]) -> torch.Tensor:
        """A forward's captures, before its first block: their rows, concatenated (every block's
        outputs at them are copied out at once)."""
        for capture in captures:
            state = self._states.setdefault(capture.token, CaptureState())
            if capture.positions is not None:
                state.fed(capture.positions)
        return torch.cat([capture.rows for capture in captures])

    def record(
        self, layer: int, outputs: torch.Tensor, captures: list[StepCapture], rows: torch.Tensor
    ) -> None:
        """Add block ``layer``'s outputs [tokens, hidden] (the residual stream) at each capture's rows
        (``rows``: theirs, concatenated, from ``begin``)."""
        picked = outputs.index_select(0, rows.to(outputs.device)).double().cpu().numpy()
        start = 0
        for capture in captures:
            mine = picked[start : start + capture.rows.numel()]
            start += capture.rows.numel()
            if layer >= capture.num_blocks:
                continue
            state = self._states[capture.token]
            summed = mine.sum(axis=0)
            state.sums[layer] = state.sums[layer] + summed if layer in state.sums else summed
            state.counts[layer] = state.counts.get(layer, 0) + len(mine)
            if capture.last_row is not None:
                state.last[layer] = outputs[capture.last_row].float().cpu().numpy()
            if capture.positions:
                oldest_kept = max(state.positions) - TAIL + 1
                for position, output in zip(capture.positions, mine, strict=True):
                    if position >= oldest_kept:
                        state.tail.setdefault(position, {})[layer] = output

    def take(self, token: str, end: int | None = None) -> dict[str, Any] | None:
        """What a capture summed (then forgotten); ``end``: an in-flight capture's sums cut before that
        position, with ``seen_last`` telling whether position ``end - 1`` was summed (None when the
        capture cannot be cut)."""
        state = self._states.pop(token, None)
        if state is None:
            return None
        seen_last = None
        if end is not None:
            if state.spoiled or not state.cut(end):
                return None
            seen_last = end - 1 in state.positions
        return {
            "sums": {layer: pack(total.astype(np.float64)) for layer, total in state.sums.items()},
            "counts": dict(state.counts),
            "last": {layer: pack(output.astype(np.float32)) for layer, output in state.last.items()},
            "seen_last": seen_last,
        }
