"""One llama.cpp context over the shared model: a lane of sequences decoded together.

llama.cpp applies a control vector to a whole context (every token of every sequence it decodes), so
a control-vector lane carries the requests of one steering plan at a time. A per-row lane instead
adds each token's own vector to the block outputs from llama.cpp's graph-evaluation callback
(``cb_eval``), so requests with different personas share one batch, as on the HF backend; the
callback costs a little on every decode, so such a lane is used only when plans are mixed. What is
added where is steering.py's. Each lane owns its KV cache: keys and values computed under one
steering are never reused under another.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from server.engine.llamacpp.steering import RowAdditions, set_control_vector
from server.engine.read_back import leading_blocks

FLASH_ATTENTION_DISABLED = 0  # llama_flash_attn_type: exact attention, as transformers computes it
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache


_BLOCK_OUTPUT = re.compile(rb"^l_out-(\d+)$")  # llama.cpp's name of block N's output, after its cvec


@functools.cache
def _libggml() -> ctypes.CDLL:
    """libggml-base as llama-cpp-python ships it, with the tensor calls the per-row lane makes."""
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    library.ggml_get_name.restype, library.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    library.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    library.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    library.ggml_nelements.restype, library.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    return library


@dataclass(frozen=True)
class LaneConfig:
    context_tokens: int  # KV cells of one lane, shared by its sequences (prompt + completion each)
    sequences: int  # sequences decoded together in one lane
    threads: int
    kv_type: str = "f16"


@dataclass
class _Reading:
    """The outputs of the leading blocks at some rows of one decode, as the callback sees them."""

    rows: np.ndarray  # batch rows read (each asks for logits)
    output_rows: np.ndarray  # the batch rows that ask for logits
    batch_rows: int
    num_blocks: int
    taken: dict[int, np.ndarray] = field(default_factory=dict)

    def take(self, block: int, output: np.ndarray) -> None:
        if output.shape[0] == self.batch_rows:
            self.taken[block] = output[self.rows].copy()
        else:  # the last block keeps only the rows with logits
            self.taken[block] = output[np.searchsorted(self.output_rows, self.rows)].copy()

    def outputs(self) -> np.ndarray:
        """[rows, num_blocks, n_embd]."""
        return np.stack([self.taken[block] for block in range(self.num_blocks)], axis=1)


@dataclass(frozen=True)
class TokenSlot:
    token: int
    position: int
    sequence: int
    logits: bool


class Lane:
    def __init__(
        self, model: ctypes.c_void_p, config: LaneConfig, n_embd: int, n_layer: int, per_row: bool = False
    ) -> None:
        self.per_row = per_row
        self._additions: RowAdditions | None = None  # per-row steering, during one decode
        self._callback_error: Exception | None = None
        self._captured: dict[int, np.ndarray] | None = None  # block -> output rows, while capturing
        self._last_captured_block = -1  # while capturing: the graph stops after this block's output
        self._reading: _Reading | None = None  # rows whose leading blocks one decode reads (closed loops)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.context_tokens
        params.n_batch = min(params.n_ctx, 2048)
        params.n_ubatch = min(params.n_batch, 512)
        params.n_seq_max = config.sequences
        params.n_threads = params.n_threads_batch = config.threads
        params.type_k = params.type_v = KV_TYPES[config.kv_type]
        params.flash_attn_type = FLASH_ATTENTION_DISABLED
        params.kv_unified = True  # one pool of cells: a long request may use what short ones leave
        self.context_tokens = config.context_tokens
        params.no_perf = True
        if per_row:
            # One llama_decode must be one ubatch, so that tensor rows are the batch's tokens in order.
            params.n_batch = params.n_ubatch
            ggml = _libggml()
            self._get_name, self._get_data, self._count = (
                ggml.ggml_get_name,
                ggml.ggml_get_data_f32,
                ggml.ggml_nelements,
            )
            self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._evaluate)  # kept alive
            params.cb_eval = self._callback
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_embd, self._n_layer = n_embd, n_layer
        self._n_vocab = 0
        self.batch_capacity = int(params.n_batch)
        self._batch = llama_cpp.llama_batch_init(self.batch_capacity, 0, config.sequences)
        self._steering: np.ndarray | None = None
        self.free_slots = list(range(config.sequences))

    def set_vocab_size(self, n_vocab: int) -> None:
        self._n_vocab = n_vocab

    def steer(self, buffer: np.ndarray | None) -> None:
        """Add ``buffer`` (n_embd x n_layer floats, block 1 first) to every block output from now on.

        Keys and values already in the cache keep the steering they were computed with, exactly as
        on the HF backend, where a hook steers the positions it sees.
        """
        if buffer is self._steering:
            return
        set_control_vector(self._ctx, buffer, self._n_embd, self._n_layer)
        self._steering = buffer

    def _evaluate(self, tensor: int, ask: bool, _user_data: int) -> bool:
        """cb_eval: asked about every graph node; adds the rows of each steered block's output, and
        while capturing, copies every block's output out.

        Returning False when told a node is done stops the computation, so a failure here is kept
        for decode() to raise rather than silently leaving a half-computed batch.
        """
        additions, reading = self._additions, self._reading
        if additions is None and self._captured is None and reading is None:
            return not ask  # observe nothing (and, if told a node is done, go on)
        try:
            match = _BLOCK_OUTPUT.match(self._get_name(tensor) or b"")
            block = int(match.group(1)) if match else -1
            if ask:
                steered = additions is not None and block in additions.blocks
                read = reading is not None and 0 <= block < reading.num_blocks
                return steered or read or (self._captured is not None and block >= 0)
            rows = self._count(tensor) // self._n_embd
            view = np.ctypeslib.as_array(self._get_data(tensor), shape=(rows, self._n_embd))
            if additions is not None:
                additions.add_to(block, view)
            if reading is not None and 0 <= block < reading.num_blocks:
                reading.take(block, view)  # after the steering, as the HF engine's hooks read
            if self._captured is not None:
                self._captured[block] = view.copy()
                # False ends the graph here: the later blocks and the output layer are not needed.
                return block != self._last_captured_block
            return True
        except Exception as exc:
            self._callback_error = exc
            return False

    def block_outputs(self, tokens: list[int], start: int, num_blocks: int | None = None) -> np.ndarray:
        """The output of the first ``num_blocks`` blocks (default: all), unsteered, for one text in an
        empty lane: [2, num_blocks, n_embd], the last position's and the mean over positions ``start:``
        (per-row lanes only). The graph stops after the last block needed."""
        if not self.per_row:
            raise ValueError("reading block outputs needs a per-row lane")
        blocks = leading_blocks(num_blocks, self._n_layer)
        last = np.zeros((blocks, self._n_embd), dtype=np.float32)
        sums = np.zeros((blocks, self._n_embd), dtype=np.float64)
        for begin in range(0, len(tokens), self.batch_capacity):
            chunk = tokens[begin : begin + self.batch_capacity]
            # The last block keeps only the rows that ask for logits: all of them when it is needed.
            every_row = blocks == self._n_layer
            slots = [
                TokenSlot(token, begin + i, 0, every_row or i == len(chunk) - 1)
                for i, token in enumerate(chunk)
            ]
            self._captured, self._last_captured_block = {}, blocks - 1
            try:
                self.decode(slots, logits_wanted=False)
                captured = self._captured
            finally:
                self._captured, self._last_captured_block = None, -1
            for block in range(blocks):
                rows = captured[block]
                first = max(start - begin, 0)
                sums[block] += rows[first:].sum(axis=0, dtype=np.float64)
                last[block] = rows[-1]
        self.clear()
        mean = (sums / max(len(tokens) - start, 1)).astype(np.float32)
        return np.stack([last, mean])

    def decode_reading(
        self,
        slots: list[TokenSlot],
        additions: dict[int, np.ndarray] | None,
        rows: list[int],
        num_blocks: int,
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """``decode``, also returning the outputs of blocks ``0..num_blocks-1`` at the slots ``rows``
        (each asks for logits): [len(rows), num_blocks, n_embd], what the steering left there."""
        if not self.per_row:
            raise ValueError("reading block outputs needs a per-row lane")
        output_rows = np.flatnonzero([slot.logits for slot in slots])
        self._reading = _Reading(np.asarray(rows), output_rows, len(slots), num_blocks)
        try:
            logits = self.decode(slots, additions)
            outputs = self._reading.outputs()
        finally:
            self._reading = None
        return logits, outputs

    def decode(
        self,
        slots: list[TokenSlot],
        additions: dict[int, np.ndarray] | None = None,
        logits_wanted: bool = True,
    ) -> list[np.ndarray]:
        """Decode the slots in one call; the logits of the slots that asked for them, in order (none
        when ``logits_wanted`` is False: a capture that stopped the graph early has none to give).

        ``additions`` (per-row lanes only): block -> [len(slots), n_embd] rows added to that block's
        output, one per slot (zeros where a token is not steered).
        """
        if not slots:
            return []
        if len(slots) > self.batch_capacity:
            raise ValueError(f"{len(slots)} tokens exceed the batch of {self.batch_capacity}")
        if additions and not self.per_row:
            raise ValueError("per-row additions need a per-row lane")
        batch = self._batch
        for index, slot in enumerate(slots):
            batch.token[index] = slot.token
            batch.pos[index] = slot.position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = slot.sequence
            batch.logits[index] = slot.logits
        batch.n_tokens = len(slots)
        if additions:
            self._additions = RowAdditions(additions, np.flatnonzero([slot.logits for slot in slots]))
        self._callback_error = None
        try:
            status = llama_cpp.llama_decode(self._ctx, batch)
        finally:
            self._additions = None
        if self._callback_error is not None:
            raise RuntimeError(f"per-row steering failed: {self._callback_error}") from self._callback_error
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}): the KV cache may be full")
        rows = []
        for index, slot in enumerate(slots):
            if slot.logits and logits_wanted:
                pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
                rows.append(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy())
        return rows

    def drop_cells(self, sequence: int) -> None:
        """Drop a sequence's cache cells; it keeps its slot."""
        llama_cpp.llama_memory_seq_rm(self._memory, sequence, -1, -1)

    def forget(self, sequence: int) -> None:
        """Drop a sequence's cache cells and give its slot back."""
        self.drop_cells(sequence)
        self.free_slots.append(sequence)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
