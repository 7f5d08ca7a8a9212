"""The GGUF backend: llama.cpp through llama-cpp-python, steered per request with control vectors.

The model is loaded once; a pool of contexts (lanes) over it serves requests in parallel, each lane
carrying one steering plan's control vector (see scheduler.py). Tokenization and the chat template
come from the GGUF file itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import torch

from server.engine.base import EngineError, GenerationRequest, ModelInfo
from server.engine.in_process import InProcessBackend
from server.engine.llamacpp.lane import KV_TYPES, Lane, LaneConfig, TokenSlot
from server.engine.llamacpp.row_callback import CallbackMissingError
from server.engine.llamacpp.scheduler import LaneScheduler, LaneSequence
from server.engine.llamacpp.steering import row_deltas, steering_buffer
from server.engine.llamacpp.vocab import LlamaVocab
from server.engine.read_back import in_flight_capture
from server.engine.sequence import Sink
from server.steering.layers import LLAMA_CPP_UNSTEERABLE_NOTE, llama_cpp_steerable_blocks

logger = logging.getLogger(__name__)


@functools.cache  # once per process: llama.cpp's backend is global to it
def _init_llama_cpp() -> None:
    # llama.cpp logs every tensor it loads: route its log through llama-cpp-python's callback and
    # keep errors only.
    from llama_cpp import _logger

    _logger.set_verbose(False)
    llama_cpp.llama_backend_init()


def built_with_openmp() -> bool:
    """Whether llama.cpp's CPU backend uses OpenMP (the default build of llama-cpp-python).

    torch's wheels bring a libgomp of the same soname, so both share one OpenMP runtime in a process:
    once llama.cpp has started its threads, libgomp counts more threads than cores and stops spinning
    between parallel regions, which slows every later torch forward pass.
    """
    return b"OPENMP = 1" in llama_cpp.llama_print_system_info()


def _response_nll(lane: Lane, tokens: list[int], first_scored: int) -> float:
    """Summed negative log-likelihood (nats) of ``tokens[first_scored + 1:]`` given what precedes,
    on an empty, unsteered lane."""
    total = 0.0
    capacity = lane.batch_capacity
    for start in range(0, len(tokens) - 1, capacity):
        chunk = range(start, min(start + capacity, len(tokens) - 1))
        slots = [TokenSlot(tokens[p], p, 0, p >= first_scored) for p in chunk]
        for position, logits in zip([p for p in chunk if p >= first_scored], lane.decode(slots), strict=True):
            log_probs = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
            total -= float(log_probs[tokens[position + 1]])
    if not math.isfinite(total):
        raise EngineError("the response has zero probability under the model")
    return total


def _architecture(path: Path) -> str:
    """The file's ``general.architecture``, as its GGUF header names it (for the error at load)."""
    try:
        field = gguf.GGUFReader(path).get_field("general.architecture")
        return field.contents() if field is not None else "unnamed"
    except (ValueError, OSError, IndexError):
        return "unreadable"


class LlamaCppBackend(InProcessBackend[LaneScheduler]):
    def __init__(
        self, model: Any, model_id: str, config: LaneConfig, contexts: int, mixed: LaneConfig | None
    ) -> None:
        self._model = model
        self._vocab = LlamaVocab(model)
        n_embd = llama_cpp.llama_model_n_embd(model)
        n_layer = llama_cpp.llama_model_n_layer(model)
        self._lanes = [Lane(model, config, n_embd, n_layer) for _ in range(contexts)]
        if mixed is not None:
            try:
                self._lanes.append(Lane(model, mixed, n_embd, n_layer, per_row=True))
            except CallbackMissingError as exc:
                raise EngineError(f"{exc}; or serve without it (--no-gguf-mixed-context)") from exc
        for lane in self._lanes:
            lane.set_vocab_size(self._vocab.size)
        self._info = ModelInfo(
            id=model_id,
            backend="llamacpp",
            num_layers=n_layer,
            hidden_size=n_embd,
            max_context=min(llama_cpp.llama_model_n_ctx_train(model), config.context_tokens),
            steerable_layers=llama_cpp_steerable_blocks(n_layer),
            unsteerable_note=LLAMA_CPP_UNSTEERABLE_NOTE,
            max_token_chars=self._vocab.max_token_chars,
            closed_loop=mixed is not None,  # in the per-row lane
            operators=("add", "ablate", "cap") if mixed is not None else ("add",),  # edits: per row
        )
        self._scheduler = LaneScheduler(self._lanes, self._vocab.eog_tokens, n_embd)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        model_id: str | None = None,
        contexts: int = 2,
        sequences_per_context: int = 8,
        mixed_sequences: int = 16,
        context_tokens: int = 8192,
        threads: int | None = None,
        kv_type: str = "f16",
    ) -> LlamaCppBackend:
        """Load a local GGUF file: ``contexts`` control-vector lanes of ``sequences_per_context``
        sequences, and (``mixed_sequences`` > 0) one per-row lane for mixed personas; each lane has
        ``context_tokens`` KV cells. One sequence may use up to min(the model's training context,
        ``context_tokens``) tokens.
        """
        path = Path(source)
        if not path.is_file():
            raise EngineError(f"no GGUF file at {path}")
        if kv_type not in KV_TYPES:
            raise EngineError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        _init_llama_cpp()
        params = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise EngineError(
                f"llama.cpp could not load {path} (architecture {_architecture(path)!r}): llama.cpp "
                f"{llama_cpp.__version__} does not know that architecture, or the file is damaged"
            )
        config = LaneConfig(
            context_tokens=context_tokens,
            sequences=sequences_per_context,
            threads=threads or os.cpu_count() or 1,
            kv_type=kv_type,
        )
        mixed = dataclasses.replace(config, sequences=mixed_sequences) if mixed_sequences > 0 else None
        return cls(model, model_id or path.stem, config, contexts, mixed)

    @property
    def vocab(self) -> LlamaVocab:
        return self._vocab

    def answer_ids(self, text: str) -> list[int]:
        return self._vocab.tokenize(text, add_special=False)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self._vocab.prompt_ids(request.prompt, request.messages, self._info.max_context)

    def _sequence(
        self, request: GenerationRequest, prompt_ids: list[int], index: int, sink: Sink
    ) -> LaneSequence:
        sequence = LaneSequence.for_request(request, prompt_ids, self._info, self._vocab, sink, index)
        if sequence.plan is not None:
            sequence.steering = steering_buffer(sequence.plan, self._info.hidden_size, self._info.num_layers)
            sequence.steering_key = sequence.plan.fingerprint()
            sequence.deltas = row_deltas(sequence.plan)
            sequence.edits = dict(sequence.plan.edits)
        if any(lane.per_row for lane in self._lanes):  # its callback reads the blocks while generating
            blocks, plan = request.monitor_blocks, sequence.plan
            sequence.capture = in_flight_capture(blocks, plan, request.loop, self._info.num_layers)
        return sequence

    def _has_per_row_lane(self) -> None:
        if not any(lane.per_row for lane in self._lanes):
            raise EngineError(
                "reading block outputs of a GGUF model needs its per-row context: serve it with "
                "--gguf-mixed-context (the default)"
            )

    async def _block_outputs(
        self, tokens: list[int], start: int, num_blocks: int | None = None
    ) -> np.ndarray:
        if len(tokens) > self._info.max_context:
            raise EngineError(f"the text exceeds the context of {self._info.max_context} tokens")
        future = self._scheduler.run_on_lane(
            lambda lane: lane.block_outputs(tokens, start, num_blocks), per_row=True
        )
        return await asyncio.wrap_future(future)

    async def response_activations(
        self, request: GenerationRequest, response_ids: list[int], num_blocks: int | None = None
    ) -> np.ndarray:
        """Mean outputs of the first ``num_blocks`` blocks (default: all) over the response tokens,
        unsteered: [num_blocks, hidden], read through llama.cpp's evaluation callback (block N's output
        is ``l_out-N``; the graph stops after the last block needed)."""
        self._has_per_row_lane()
        tokens, start = self._answer_tokens(request, response_ids)
        outputs = await self._block_outputs(tokens, start, num_blocks)
        return outputs[1]

    async def text_activations(
        self, texts: list[str], progress: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """Block outputs for raw texts, unsteered: [len(texts), 2 (last token, mean), num_layers, hidden]."""
        self._has_per_row_lane()
        rows = []
        for index, text in enumerate(texts):
            tokens = self._vocab.tokenize(text, add_special=True)[: self._info.max_context]
            if not tokens:
                raise EngineError("a text encodes to no tokens")
            rows.append(await self._block_outputs(tokens, 0))
            if progress is not None:
                progress((index + 1) / len(texts))
        return np.stack(rows)

    async def response_nll(self, request: GenerationRequest, response_ids: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) and count of the response tokens, unsteered."""
        tokens, start = self._answer_tokens(request, response_ids)
        if len(tokens) > self._info.max_context:
            raise EngineError(f"prompt and response exceed the context of {self._info.max_context} tokens")
        # The logits at position p predict token p + 1: scoring starts at the last prompt token.
        future = self._scheduler.run_on_lane(
            lambda lane: (_response_nll(lane, tokens, start - 1), len(response_ids))
        )
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        for lane in self._lanes:
            lane.close()
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
