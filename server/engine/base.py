"""The contract between the serving layer and an inference backend.

An engine receives an already resolved ``SteeringPlan`` (layer -> vector, strength, positions), never
a persona name, and streams ``TokenChunk``s back.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np

from server.errors import InvalidRequest
from server.steering.plan import SteeringPlan


class EngineError(InvalidRequest):
    """A request the engine cannot serve as asked (too long for the context, bad sampling values)."""


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context window was reached


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below 1e-5) means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    # True when the client named no max_tokens: stop at the context window instead of refusing.
    clamp_to_context: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise EngineError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        # Below this, sampling is argmax in all but name, and dividing by it overflows.
        return self.temperature < 1e-5


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of ``prompt`` (raw text) or ``messages`` (rendered with the model's chat template)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: Sequence[ChatMessage] | None = None
    steering: SteeringPlan | None = None
    request_id: str = ""
    # Monitoring: the answer's mean output of the first N blocks is wanted. A backend that can read
    # it while generating, exactly as an unsteered read-back would, puts it on the last chunk.
    monitor_blocks: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise EngineError("a generation request takes either a prompt or messages")


@dataclass(frozen=True)
class TokenChunk:
    """A piece of a streamed generation. The last chunk of a stream carries ``finish_reason``."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int  # cumulative, including this chunk
    finish_reason: FinishReason | None = None
    # On the first chunk only: seconds from submission to the scheduler until the request's prefill began.
    queue_seconds: float | None = None
    # On the last chunk, when the request asked for ``monitor_blocks`` and they were read in flight:
    # the mean output of those blocks over the response tokens [monitor_blocks, hidden].
    response_means: np.ndarray | None = None


@dataclass(frozen=True)
class ModelInfo:
    id: str
    backend: str
    num_layers: int
    hidden_size: int
    max_context: int
    steerable_layers: tuple[int, ...]  # block indices a plan may name
    # Why a block of the model is not in steerable_layers, in the engine's words (error messages).
    unsteerable_note: str = ""

    def why_unsteerable(self, layer: int) -> str:
        """`` (reason)`` for a block of the model that cannot be steered, else nothing."""
        inside = 0 <= layer < self.num_layers and layer not in self.steerable_layers
        return f" ({self.unsteerable_note})" if inside and self.unsteerable_note else ""


@runtime_checkable
class Backend(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream the generation; closing the iterator early cancels the request."""
        ...

    async def response_activations(
        self, request: GenerationRequest, response_ids: list[int], num_blocks: int | None = None
    ) -> np.ndarray:
        """Mean output of the first ``num_blocks`` decoder blocks (default: all) over the response
        tokens, unsteered: [num_blocks, hidden]. A backend may stop its pass after those blocks."""
        ...

    async def text_activations(
        self, texts: list[str], progress: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """Block outputs for raw texts, unsteered: [len(texts), 2 (last token, mean), num_layers, hidden]."""
        ...

    async def response_nll(self, request: GenerationRequest, response_ids: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) and count of the response tokens, unsteered."""
        ...

    async def close(self) -> None: ...
