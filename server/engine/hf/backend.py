"""The HF transformers backend: a local or hub model, chat templates, continuous batching, steering."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedModel

from server.engine.base import EngineError, GenerationRequest, ModelInfo
from server.engine.hf.read_back import ReadBackBatcher
from server.engine.hf.runner import ModelRunner
from server.engine.hf.scheduler import Scheduler
from server.engine.in_process import InProcessBackend
from server.engine.model_loading import load_causal_lm
from server.engine.prompt_bound import hf_max_token_chars
from server.engine.prompts import answer_ids, eos_token_ids, prompt_ids
from server.engine.read_back import in_flight_capture, leading_blocks
from server.engine.sequence import Sequence, Sink

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _max_context(model: PreTrainedModel, tokenizer: Any) -> int:
    text_config = model.config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(tokenizer.model_max_length, 1 << 20))


class HFBackend(InProcessBackend[Scheduler]):
    """Serves one transformers causal LM; every request may carry its own steering plan."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, model_id: str, max_batch_size: int = 32
    ) -> None:
        self._tokenizer = tokenizer
        self._runner = ModelRunner(model)
        layout = self._runner.layout
        self._info = ModelInfo(
            id=model_id,
            backend="hf",
            num_layers=layout.num_layers,
            hidden_size=layout.hidden_size,
            max_context=_max_context(model, tokenizer),
            steerable_layers=tuple(range(layout.num_layers)),
            max_token_chars=hf_max_token_chars(tokenizer),
            closed_loop=True,
            operators=("add", "ablate", "cap"),
            vocab_size=len(tokenizer),  # what Sequence.for_request checks stop_token_ids against
        )
        eos_ids = eos_token_ids(model.generation_config, tokenizer)
        self._scheduler = Scheduler(self._runner, eos_ids, max_batch_size)
        self._read_backs = ReadBackBatcher(self._runner, self._scheduler.run_on_model, max_tokens=4096)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        model_id: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 32,
        revision: str | None = None,
    ) -> HFBackend:
        """Load from a local directory or a hub id (the hub is reached only for ids not on disk)."""
        if dtype not in DTYPES:
            raise EngineError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        tokenizer = AutoTokenizer.from_pretrained(str(source), revision=revision)
        model = load_causal_lm(source, revision=revision, dtype=DTYPES[dtype])
        model.to(device)
        name = model_id or Path(str(source).rstrip("/")).name
        return cls(model, tokenizer, name, max_batch_size=max_batch_size)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def answer_ids(self, text: str) -> list[int]:
        return answer_ids(self._tokenizer, text)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: raw text as the tokenizer encodes it, or messages via the chat template."""
        return prompt_ids(self._tokenizer, request, self._info)

    def _sequence(self, request: GenerationRequest, prompt: list[int], index: int, sink: Sink) -> Sequence:
        sequence = Sequence.for_request(request, prompt, self._info, self._tokenizer, sink, index)
        sequence.capture = in_flight_capture(
            request.monitor_blocks, sequence.plan, request.loop, self._info.num_layers
        )
        return sequence

    async def _read_back(self, request: GenerationRequest, response_ids: list[int], work: Any) -> Any:
        """Run ``work(prompt + response ids, prompt length)`` on the model, between decode steps."""
        tokens, start = self._answer_tokens(request, response_ids)
        return await asyncio.wrap_future(self._scheduler.run_on_model(lambda: work(tokens, start)))

    async def response_activations(
        self, request: GenerationRequest, response_ids: list[int], num_blocks: int | None = None
    ) -> np.ndarray:
        """Mean outputs of the first ``num_blocks`` blocks (default: all) over the response tokens,
        unsteered: [num_blocks, hidden]. Read-backs asked for together share forward passes."""
        tokens, start = self._answer_tokens(request, response_ids)
        blocks = leading_blocks(num_blocks, self._info.num_layers)
        return (await asyncio.wrap_future(self._read_backs.submit(tokens, start, blocks))).numpy()

    async def text_activations(
        self, texts: list[str], progress: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """Block outputs for raw texts, unsteered: [len(texts), 2 (last token, mean), num_layers, hidden]."""
        encoded = [list(self._tokenizer(text)["input_ids"])[: self._info.max_context] for text in texts]
        if any(not ids for ids in encoded):
            raise EngineError("a text encodes to no tokens")
        rows: list[torch.Tensor] = []
        for start in range(0, len(encoded), 8):  # a few texts at a time: generation goes on between
            group = encoded[start : start + 8]
            work = lambda group=group: [self._runner.block_outputs_last_and_mean(ids) for ids in group]  # noqa: E731
            rows += await asyncio.wrap_future(self._scheduler.run_on_model(work))
            if progress is not None:
                progress(len(rows) / len(encoded))
        return torch.stack(rows).numpy()

    async def response_nll(self, request: GenerationRequest, response_ids: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) and count of the response tokens, unsteered."""
        return await self._read_back(request, response_ids, self._runner.response_nll)

    def _release(self) -> None:
        self._runner.hooks.remove()
