"""Where a vector meets the residual stream of a GGUF model: control vectors and per-row additions.

A control vector (``llama_set_adapter_cvec``) is added to every token a context decodes, so a
control-vector lane carries the requests of one plan at a time. The per-row lane instead adds each
token's own deltas to the block outputs from llama.cpp's graph-evaluation callback (compiled C,
row_callback.py), so requests with different plans share one batch. Both add ``strength * vector``
to the output of block L, exactly as the HF backend's hooks do; the buffer's layout is in
server/steering/layers.py.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from server.engine.llamacpp.row_callback import RowEdits
from server.steering.errors import SteeringError
from server.steering.layers import (
    LLAMA_CPP_FIRST_STEERABLE_BLOCK,
    LLAMA_CPP_UNSTEERABLE_NOTE,
    llama_cpp_buffer_offset,
)
from server.steering.operators import BlockEdit
from server.steering.plan import SteeringPlan

# (block -> delta of one sequence, is this token steered?) for each row of a per-row batch.
RowSteering = tuple[dict[int, np.ndarray], bool]


def steering_buffer(plan: SteeringPlan, n_embd: int, n_layer: int) -> np.ndarray:
    """The plan as llama.cpp wants it: n_embd x n_layer floats, block 1 first (block 0 is never steered)."""
    buffer = np.zeros(n_embd * n_layer, dtype=np.float32)
    for layer, delta in plan.deltas.items():
        if layer < LLAMA_CPP_FIRST_STEERABLE_BLOCK:
            raise SteeringError(
                f"{LLAMA_CPP_UNSTEERABLE_NOTE} (they start at block {LLAMA_CPP_FIRST_STEERABLE_BLOCK}); "
                f"choose blocks {LLAMA_CPP_FIRST_STEERABLE_BLOCK}..{n_layer - 1} for this GGUF model"
            )
        start = llama_cpp_buffer_offset(layer, n_embd)
        buffer[start : start + n_embd] = delta.numpy()
    return buffer


def set_control_vector(ctx: ctypes.c_void_p, buffer: np.ndarray | None, n_embd: int, n_layer: int) -> None:
    """Add ``buffer`` (from ``steering_buffer``) to every block output the context computes from now
    on; None takes it off."""
    if buffer is None:
        result = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)
    else:
        pointer = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        result = llama_cpp.llama_set_adapter_cvec(
            ctx, pointer, buffer.size, n_embd, LLAMA_CPP_FIRST_STEERABLE_BLOCK, n_layer - 1
        )
    if result != 0:
        raise RuntimeError(f"llama_set_adapter_cvec failed ({result})")


def row_deltas(plan: SteeringPlan | None) -> dict[int, np.ndarray]:
    """block -> strength * vector as float32 arrays: what the per-row lane adds for this plan."""
    return {} if plan is None else {block: delta.numpy() for block, delta in plan.deltas.items()}


def per_row_additions(rows: list[RowSteering], hidden: int) -> dict[int, np.ndarray]:
    """block -> [len(rows), hidden]: for each row, its delta where the token is steered, else zeros."""
    blocks = {block for deltas, steered in rows if steered for block in deltas}
    additions = {block: np.zeros((len(rows), hidden), dtype=np.float32) for block in blocks}
    for index, (deltas, steered) in enumerate(rows):
        if steered:
            for block, delta in deltas.items():
                additions[block][index] = delta
    return additions


# (block -> the edits of one sequence, is this token steered?) for each row of a per-row batch.
RowEditing = tuple[dict[int, tuple[BlockEdit, ...]], bool]


def per_row_edits(rows: list[RowEditing], hidden: int) -> RowEdits | None:
    """block -> rounds of ([len(rows), hidden] units, [len(rows), 4] active/alpha/low/high): the
    k-th edit of each row that has one there, where its token is steered (None: no edits)."""
    rounds: dict[int, int] = {}
    for edits, steered in rows:
        if steered:
            for block, listed in edits.items():
                rounds[block] = max(rounds.get(block, 0), len(listed))
    if not rounds:
        return None
    tables: RowEdits = {
        block: [
            (np.zeros((len(rows), hidden), np.float32), np.zeros((len(rows), 4), np.float32))
            for _ in range(n)
        ]
        for block, n in rounds.items()
    }
    for index, (edits, steered) in enumerate(rows):
        if not steered:
            continue
        for block, listed in edits.items():
            for (units, params), edit in zip(tables[block], listed, strict=False):
                units[index] = edit.unit.numpy()
                params[index] = (1.0, edit.alpha, edit.low, edit.high)
    return tables
