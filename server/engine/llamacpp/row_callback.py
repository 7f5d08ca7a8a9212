"""The per-row lane's evaluation callback: compiled C (``_row_callback.c``), driven from here.

llama.cpp's scheduler asks ``cb_eval`` about every node of every graph it computes, on the thread
that drives the computation while the worker threads wait. A Python callback took the GIL for each
question, so whatever else the process ran in Python (the server's event loop streaming answers)
stalled every decode of the lane. The compiled callback never touches the GIL. Before each decode,
``RowCallback.armed`` fills in the plan it follows (what to add to which block's output at which
rows, which rows to read, where to stop the graph); between decodes it observes nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

_ROWS_MISMATCH = 1  # enum row_callback_error in _row_callback.c

_INT64_ARRAY = ctypes.POINTER(ctypes.c_int64)
_FLOAT_ARRAY = ctypes.POINTER(ctypes.c_float)


class _Plan(ctypes.Structure):
    """row_callback_plan in _row_callback.c, field for field."""

    _fields_ = [
        ("tensor_name", ctypes.c_void_p),
        ("tensor_data", ctypes.c_void_p),
        ("tensor_count", ctypes.c_void_p),
        ("n_embd", ctypes.c_int64),
        ("n_blocks", ctypes.c_int32),
        ("active", ctypes.c_int32),
        ("batch_rows", ctypes.c_int64),
        ("n_outputs", ctypes.c_int64),
        ("output_rows", _INT64_ARRAY),
        ("additions", ctypes.POINTER(_FLOAT_ARRAY)),
        ("edit_units", ctypes.POINTER(_FLOAT_ARRAY)),
        ("edit_params", ctypes.POINTER(_FLOAT_ARRAY)),
        ("edit_rounds", ctypes.POINTER(ctypes.c_int32)),
        ("read_blocks", ctypes.c_int32),
        ("n_read", ctypes.c_int64),
        ("read_rows", _INT64_ARRAY),
        ("read_output", _INT64_ARRAY),
        ("read_out", _FLOAT_ARRAY),
        ("stop_after_block", ctypes.c_int32),
        ("error", ctypes.c_int32),
        ("error_block", ctypes.c_int32),
    ]


class CallbackMissingError(RuntimeError):
    """persona-server was installed without its compiled callback (no C compiler at install)."""


@functools.cache
def _compiled() -> ctypes.CDLL:
    try:
        from server.engine.llamacpp import _row_callback  # built by setup.py at install
    except ImportError as exc:
        raise CallbackMissingError(
            "the per-row lane needs persona-server's compiled evaluation callback, which was not built "
            "at install (no C compiler?): install a C compiler and reinstall persona-server"
        ) from exc
    library = ctypes.CDLL(_row_callback.__file__)
    library.persona_row_callback.restype = ctypes.c_bool
    return library


@functools.cache
def _libggml() -> ctypes.CDLL:
    """libggml-base as llama-cpp-python ships it: the tensor accessors the callback calls."""
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


def _address(function: ctypes._CFuncPtr) -> int:  # type: ignore[name-defined]
    return ctypes.cast(function, ctypes.c_void_p).value or 0


def _int64s(values: np.ndarray) -> ctypes._Pointer:  # type: ignore[name-defined]
    return values.ctypes.data_as(_INT64_ARRAY)


# block -> rounds of ([rows, n_embd] unit directions, [rows, 4] active/alpha/low/high) (steering.py).
RowEdits = dict[int, list[tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class Reading:
    """Read blocks ``0..blocks-1`` at batch ``rows`` (each asks for logits, unless every row does)."""

    rows: np.ndarray
    blocks: int


class RowCallback:
    """One per-row lane's callback: the function llama.cpp calls, and the plan it follows."""

    def __init__(self, n_embd: int, n_blocks: int) -> None:
        ggml = _libggml()
        self._plan = _Plan(
            tensor_name=_address(ggml.ggml_get_name),
            tensor_data=_address(ggml.ggml_get_data_f32),
            tensor_count=_address(ggml.ggml_nelements),
            n_embd=n_embd,
            n_blocks=n_blocks,
            stop_after_block=-1,
        )
        self._n_embd, self._n_blocks = n_embd, n_blocks
        self.function = llama_cpp.ggml_backend_sched_eval_callback(_address(_compiled().persona_row_callback))
        self.user_data = ctypes.cast(ctypes.pointer(self._plan), ctypes.c_void_p)

    @contextmanager
    def armed(
        self,
        output_rows: np.ndarray,
        batch_rows: int,
        additions: dict[int, np.ndarray] | None = None,
        reading: Reading | None = None,
        stop_after_block: int = -1,
        edits: RowEdits | None = None,
    ) -> Iterator[np.ndarray | None]:
        """For the decode run inside: add ``additions`` (block -> [batch_rows, n_embd] float32) to the
        block outputs, read ``reading`` into the array yielded ([rows, blocks, n_embd], filled once
        the decode returns), and end the graph after ``stop_after_block``; ``edits`` (block -> rounds
        of ([batch_rows, n_embd] units, [batch_rows, 4] active/alpha/low/high)) edit the block
        outputs after the additions. Raises if a block output had a shape the plan did not expect."""
        plan = self._plan
        output_rows = np.ascontiguousarray(output_rows, dtype=np.int64)
        kept = [output_rows]  # what the plan points at lives until the decode is done
        table = (_FLOAT_ARRAY * self._n_blocks)()
        for block, rows in (additions or {}).items():
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            if rows.shape != (batch_rows, self._n_embd):
                expected = (batch_rows, self._n_embd)
                raise ValueError(f"block {block} additions are {rows.shape}, not {expected}")
            kept.append(rows)
            table[block] = rows.ctypes.data_as(_FLOAT_ARRAY)
        units_table, params_table, rounds = self._edit_tables(batch_rows, edits or {}, kept)
        plan.edit_units, plan.edit_params, plan.edit_rounds = units_table, params_table, rounds
        out = None
        plan.read_blocks, plan.n_read = 0, 0
        if reading is not None:
            read_rows = np.ascontiguousarray(reading.rows, dtype=np.int64)
            # The last block keeps only the rows that ask for logits: a read row's place among them.
            read_output = np.searchsorted(output_rows, read_rows).astype(np.int64)
            out = np.empty((len(read_rows), reading.blocks, self._n_embd), dtype=np.float32)
            kept += [read_rows, read_output, out]
            plan.read_blocks, plan.n_read = reading.blocks, len(read_rows)
            plan.read_rows, plan.read_output = _int64s(read_rows), _int64s(read_output)
            plan.read_out = out.ctypes.data_as(_FLOAT_ARRAY)
        plan.batch_rows, plan.n_outputs = batch_rows, len(output_rows)
        plan.output_rows, plan.additions = _int64s(output_rows), table
        plan.stop_after_block = stop_after_block
        plan.error = plan.error_block = 0
        plan.active = 1
        try:
            yield out
        finally:
            plan.active = 0
            plan.stop_after_block, plan.read_blocks, plan.n_read = -1, 0, 0
            del kept
        if plan.error == _ROWS_MISMATCH:
            raise RuntimeError(
                f"per-row steering failed: block {plan.error_block}'s output has neither every row of "
                f"the batch ({batch_rows}) nor its {len(output_rows)} rows with logits"
            )

    def _edit_tables(
        self, batch_rows: int, edits: RowEdits, kept: list[object]
    ) -> tuple[object, object, object]:
        """The plan's edit tables for ``edits``; what they point at is appended to ``kept``."""
        units_table = (_FLOAT_ARRAY * self._n_blocks)()
        params_table = (_FLOAT_ARRAY * self._n_blocks)()
        rounds = (ctypes.c_int32 * self._n_blocks)()
        for block, listed in edits.items():
            units = np.ascontiguousarray(np.stack([u for u, _ in listed]), dtype=np.float32)
            params = np.ascontiguousarray(np.stack([p for _, p in listed]), dtype=np.float32)
            if units.shape[1:] != (batch_rows, self._n_embd) or params.shape[1:] != (batch_rows, 4):
                raise ValueError(f"block {block} edits are {units.shape} and {params.shape}")
            kept += [units, params]
            units_table[block] = units.ctypes.data_as(_FLOAT_ARRAY)
            params_table[block] = params.ctypes.data_as(_FLOAT_ARRAY)
            rounds[block] = len(listed)
        kept += [units_table, params_table, rounds]
        return units_table, params_table, rounds
