"""What the engines that run a model in this process share (HF, llama.cpp).

Each has a scheduler thread that owns the model (scheduler.py); a request becomes a ``Sequence`` on
that thread and streams back through ``stream``; an answer read back is its prompt and response ids.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

from server.engine.base import GenerationRequest, ModelInfo, TokenChunk
from server.engine.read_back import answer_tokens
from server.engine.scheduler import EngineScheduler
from server.engine.sequence import Sequence, Sink, stream

SchedulerT = TypeVar("SchedulerT", bound=EngineScheduler[Any, Any])


class InProcessBackend(ABC, Generic[SchedulerT]):
    _info: ModelInfo
    _scheduler: SchedulerT

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def scheduler(self) -> SchedulerT:
        return self._scheduler

    @abstractmethod
    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: raw text as the model's tokenizer encodes it, or messages via its template."""

    @abstractmethod
    def _sequence(
        self, request: GenerationRequest, prompt_ids: list[int], index: int, sink: Sink
    ) -> Sequence:
        """Answer ``index`` of the request as its scheduler runs it (EngineError or SteeringError if
        it cannot)."""

    def _sequences(self, request: GenerationRequest, sink: Sink) -> list[Sequence]:
        prompt_ids = self.prompt_ids(request)  # once for the n answers
        return [self._sequence(request, prompt_ids, index, sink) for index in range(request.n)]

    def failure(self) -> str | None:
        """Why the engine can no longer serve (its scheduler died), or None while it can."""
        return self._scheduler.failure

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        return stream(lambda sink: self._sequences(request, sink), self._scheduler.submit)

    def _answer_tokens(self, request: GenerationRequest, response_ids: list[int]) -> tuple[list[int], int]:
        """Prompt and response ids of an answer to read back, and where the response starts."""
        return answer_tokens(self.prompt_ids(request), response_ids)

    async def close(self) -> None:
        await asyncio.to_thread(self._scheduler.stop)
        self._release()

    @abstractmethod
    def _release(self) -> None:
        """Free what the model holds, once its scheduler thread has stopped."""
