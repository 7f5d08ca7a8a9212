"""One llama.cpp context over the shared model: a lane of sequences decoded together.

llama.cpp applies a control vector to a whole context (every token of every sequence it decodes), so
a control-vector lane carries the requests of one steering plan at a time. A per-row lane instead
adds each token's own vector to the block outputs from llama.cpp's graph-evaluation callback
(``cb_eval``, compiled C: row_callback.py), so requests with different personas share one batch,
as on the HF backend; the callback splits the graph at each block it touches, so such a lane is used
only when plans are mixed or blocks are read. What is added where is steering.py's. Each lane owns
its KV cache: keys and values computed under one steering are never reused under another.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np

from server.engine.llamacpp.row_callback import Reading, RowCallback, RowEdits
from server.engine.llamacpp.steering import set_control_vector
from server.engine.read_back import leading_blocks

FLASH_ATTENTION_DISABLED = 0  # llama_flash_attn_type: exact attention, as transformers computes it
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache


@dataclass(frozen=True)
class LaneConfig:
    context_tokens: int  # KV cells of one lane, shared by its sequences (prompt + completion each)
    sequences: int  # sequences decoded together in one lane
    threads: int
    kv_type: str = "f16"


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
            self._callback = RowCallback(n_embd, n_layer)  # kept alive with the context
            params.cb_eval, params.cb_eval_user_data = self._callback.function, self._callback.user_data
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
            reading = Reading(np.arange(len(chunk)), blocks)
            _, captured = self._decode(slots, None, reading, stop_after_block=blocks - 1)
            first = max(start - begin, 0)
            sums += captured[first:].sum(axis=0, dtype=np.float64)  # type: ignore[index]
            last = captured[-1]  # type: ignore[index]
        self.clear()
        mean = (sums / max(len(tokens) - start, 1)).astype(np.float32)
        return np.stack([last, mean])

    def decode_reading(
        self,
        slots: list[TokenSlot],
        additions: dict[int, np.ndarray] | None,
        rows: list[int],
        num_blocks: int,
        edits: RowEdits | None = None,
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """``decode``, also returning the outputs of blocks ``0..num_blocks-1`` at the slots ``rows``
        (each asks for logits): [len(rows), num_blocks, n_embd], what the steering left there."""
        if not self.per_row:
            raise ValueError("reading block outputs needs a per-row lane")
        logits, outputs = self._decode(slots, additions, Reading(np.asarray(rows), num_blocks), edits=edits)
        return logits, outputs  # type: ignore[return-value]

    def decode(
        self,
        slots: list[TokenSlot],
        additions: dict[int, np.ndarray] | None = None,
        edits: RowEdits | None = None,
    ) -> list[np.ndarray]:
        """Decode the slots in one call; the logits of the slots that asked for them, in order.

        ``additions`` (per-row lanes only): block -> [len(slots), n_embd] rows added to that block's
        output, one per slot (zeros where a token is not steered); ``edits`` (per-row lanes only) the
        rounds of edits after them (``steering.per_row_edits``).
        """
        return self._decode(slots, additions, edits=edits)[0]

    def _decode(
        self,
        slots: list[TokenSlot],
        additions: dict[int, np.ndarray] | None,
        reading: Reading | None = None,
        stop_after_block: int = -1,
        edits: RowEdits | None = None,
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The logits asked for (none when the graph stops after ``stop_after_block``: it never
        reaches the output layer) and what ``reading`` read."""
        if not slots:
            return [], None
        if len(slots) > self.batch_capacity:
            raise ValueError(f"{len(slots)} tokens exceed the batch of {self.batch_capacity}")
        if (additions or edits) and not self.per_row:
            raise ValueError("per-row additions and edits need a per-row lane")
        batch = self._batch
        for index, slot in enumerate(slots):
            batch.token[index] = slot.token
            batch.pos[index] = slot.position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = slot.sequence
            batch.logits[index] = slot.logits
        batch.n_tokens = len(slots)
        read = None
        if additions or edits or reading is not None or stop_after_block >= 0:
            output_rows = np.flatnonzero([slot.logits for slot in slots])
            armed = self._callback.armed(output_rows, len(slots), additions, reading, stop_after_block, edits)
            with armed as read:
                status = llama_cpp.llama_decode(self._ctx, batch)
        else:
            status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}): the KV cache may be full")
        rows = []
        if stop_after_block < 0:
            for index, slot in enumerate(slots):
                if slot.logits:
                    pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
                    rows.append(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy())
        return rows, read

    def copy_cells(self, sequence: int, target: Lane, target_sequence: int) -> bool:
        """Copy a sequence's cache cells into ``target_sequence`` of another lane over the same model,
        bit for bit (the keys and values computed here, under this lane's steering); False when the
        target has no run of free cells long enough."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, sequence)
        state = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, state, size, sequence)
        if not written:
            return False
        return bool(llama_cpp.llama_state_seq_set_data(target._ctx, state, written, target_sequence))

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
