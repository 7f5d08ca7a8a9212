"""One llama.cpp context over the shared model: a lane of sequences that share one control vector.

llama.cpp applies a control vector to a whole context (every token of every sequence it decodes), so
a lane carries the requests of one steering plan at a time; requests with another plan use another
lane. Each lane owns its KV cache, so keys and values computed under one vector can never be reused
under another.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np

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
    def __init__(self, model: ctypes.c_void_p, config: LaneConfig, n_embd: int, n_layer: int) -> None:
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
        if buffer is None:
            result = llama_cpp.llama_set_adapter_cvec(self._ctx, None, 0, self._n_embd, -1, -1)
        else:
            pointer = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            result = llama_cpp.llama_set_adapter_cvec(
                self._ctx, pointer, buffer.size, self._n_embd, 1, self._n_layer - 1
            )
        if result != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({result})")
        self._steering = buffer

    def decode(self, slots: list[TokenSlot]) -> list[np.ndarray]:
        """Decode the slots in one call; the logits of the slots that asked for them, in order."""
        if not slots:
            return []
        if len(slots) > self.batch_capacity:
            raise ValueError(f"{len(slots)} tokens exceed the batch of {self.batch_capacity}")
        batch = self._batch
        for index, slot in enumerate(slots):
            batch.token[index] = slot.token
            batch.pos[index] = slot.position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = slot.sequence
            batch.logits[index] = slot.logits
        batch.n_tokens = len(slots)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}): the KV cache may be full")
        rows = []
        for index, slot in enumerate(slots):
            if slot.logits:
                pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
                rows.append(np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy())
        return rows

    def forget(self, sequence: int) -> None:
        """Drop a sequence's cache cells and give its slot back."""
        llama_cpp.llama_memory_seq_rm(self._memory, sequence, -1, -1)
        self.free_slots.append(sequence)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
