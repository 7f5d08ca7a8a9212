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
        for position in [p for p in self.tail if p < self.oldest_kept]:
            del self.tail[position]

    @property
    def oldest_kept(self) -> int:
        """The oldest position whose outputs stay apart in the tail."""
        return max(self.positions, default=0) - TAIL + 1


@dataclass(frozen=True)
class StepCapture:
    """One capture's share of a forward: the read rows its tokens' block outputs were summed into.

    ``sum_row`` sums ``sum_count`` tokens at once; each token in ``kept`` has a row of its own (the
    last prompt token, whose outputs are kept; every position of an in-flight capture, kept apart for
    the cut); a kept token at a position from ``start`` on is summed too."""

    token: str
    num_blocks: int
    start: int
    sum_row: int | None
    sum_count: int
    kept: tuple[tuple[int, int], ...]  # (read row, position)
    last_position: int | None  # the position whose outputs are kept as "last", when in this forward
    in_flight: bool = False

    @property
    def positions(self) -> tuple[int, ...]:
        """An in-flight capture's positions in this forward (all kept apart)."""
        return tuple(position for _, position in self.kept) if self.in_flight else ()


class WorkerCaptures:
    def __init__(self) -> None:
        self._states: dict[str, CaptureState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def begin(self, captures: list[StepCapture]) -> None:
        """A forward's captures, before it runs."""
        for capture in captures:
            state = self._states.setdefault(capture.token, CaptureState())
            if capture.in_flight:
                state.fed(capture.positions)

    def spoil(self, token: str) -> None:
        """A capture whose positions found no read rows: its sums cannot be trusted."""
        self._states.setdefault(token, CaptureState()).spoiled = True

    def record(self, capture: StepCapture, reads: np.ndarray, layers: list[int]) -> None:
        """Add what ``capture`` read in a forward: ``reads[block, row]``, float64 [blocks, rows, hidden],
        the forward's read rows; ``layers``: the blocks this worker owns."""
        state = self._states[capture.token]
        blocks = [layer for layer in layers if layer < capture.num_blocks]
        if not blocks:
            return
        for layer in blocks:
            total = reads[layer, capture.sum_row].copy() if capture.sum_row is not None else None
            count = capture.sum_count
            for row, position in capture.kept:
                output = reads[layer, row]
                if position >= capture.start:
                    total = output.copy() if total is None else total + output
                    count += 1
                if position == capture.last_position:
                    state.last[layer] = output.astype(np.float32)
                if capture.in_flight and position >= state.oldest_kept:
                    state.tail.setdefault(position, {})[layer] = output
            if total is not None and count:
                state.sums[layer] = state.sums[layer] + total if layer in state.sums else total
                state.counts[layer] = state.counts.get(layer, 0) + count

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
