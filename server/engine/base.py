"""The contract between the serving layer and an inference backend.

An engine receives an already resolved ``SteeringPlan`` (layer -> vector, strength, positions), never
a persona name, and streams ``TokenChunk``s back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np

from server.errors import InvalidRequest
from server.steering.closed_loop import LoopSpec, TokenTrace
from server.steering.plan import SteeringPlan


class EngineError(InvalidRequest):
    """A request the engine cannot serve as asked (too long for the context, bad sampling values)."""


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context window was reached


MAX_LOGPROBS = 20  # the most alternatives a token's logprobs may list, as in vLLM and OpenAI


@dataclass(frozen=True)
class StructuredOutput:
    """Constrained decoding: every answer is JSON (``schema`` None: any JSON object)."""

    schema: dict[str, object] | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen, with vLLM's meanings (and its order: stop ids held back below
    ``min_tokens``, penalties, then greedy argmax or temperature, min_p, top_k, top_p)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below 1e-5) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): every token
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already in the answer
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the answer
    repetition_penalty: float = 1.0  # vLLM's: logits of prompt and answer tokens divided (>0) or multiplied
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # no end-of-sequence, stop id or stop string before this many tokens
    seed: int | None = None
    ignore_eos: bool = False
    # Log-probabilities of each generated token and of this many likeliest alternatives; None: none.
    logprobs: int | None = None
    structured: StructuredOutput | None = None
    # True when the client named no max_tokens: stop at the context window instead of refusing.
    clamp_to_context: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EngineError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not (0 < self.top_p <= 1):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise EngineError(f"top_k must be -1, 0 or positive, got {self.top_k}", "top_k")
        if not (0 <= self.min_p <= 1):
            raise EngineError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2 <= getattr(self, name) <= 2):
                raise EngineError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            message = f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            raise EngineError(message, "repetition_penalty")
        if not (0 <= self.min_tokens <= self.max_tokens):
            message = f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}"
            raise EngineError(message, "min_tokens")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise EngineError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if any(token < 0 for token in self.stop_token_ids):
            raise EngineError("stop_token_ids must be token ids (>= 0)", "stop_token_ids")
        if any(not s for s in self.stop):
            raise EngineError("stop strings must not be empty", "stop")

    @property
    def greedy(self) -> bool:
        # Below this, sampling is argmax in all but name, and dividing by it overflows.
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain_argmax(self) -> bool:
        """The next token is the argmax of the model's logits, and nothing else is wanted of them."""
        return self.greedy and not self.penalized and not self.min_tokens and self.logprobs is None


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
    # Answers to the prompt, each streamed with its own ``TokenChunk.index``; answer i samples with
    # seed + i (as vLLM's n does), and an engine may share their prompt's prefill.
    n: int = 1
    # Closed-loop steering (engines whose ModelInfo.closed_loop is True): readings per token, a
    # target, rules. ``steering`` then holds the prompt's steering (the target at its first strength).
    loop: LoopSpec | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise EngineError("a generation request takes either a prompt or messages")
        if self.n < 1:
            raise EngineError(f"n must be at least 1, got {self.n}", "n")
        if self.loop is not None and self.n > 1:
            raise EngineError("closed-loop steering follows one answer: n must be 1", "n")

    def choice_sampling(self, index: int) -> SamplingParams:
        """The sampling of answer ``index``: the request's, with seed + index when it has a seed."""
        seed = self.sampling.seed
        if index == 0 or seed is None:
            return self.sampling
        return dataclasses.replace(self.sampling, seed=(seed + index) % 2**64)


@dataclass(frozen=True)
class TokenChunk:
    """A piece of a streamed generation. The last chunk of each answer carries ``finish_reason``."""

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
    index: int = 0  # which of the request's n answers this chunk belongs to
    # When the request asked for logprobs: one entry per token of ``token_ids``.
    logprobs: tuple[TokenLogprob, ...] | None = None
    # When the request has a closed loop: one entry per token of ``token_ids``.
    traces: tuple[TokenTrace, ...] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the (steered) model, and its likeliest alternatives.

    The distribution is the model's own, before penalties, temperature and truncation (vLLM's default
    ``raw_logprobs``, and what the OpenAI API reports)."""

    token_id: int
    token: str  # the token's text as the tokenizer decodes it alone
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob), likeliest first


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
    constrained_decoding: bool = False  # whether it can hold answers to JSON (response_format)
    # The most characters of text one token stands for (None: no sound bound): prompts longer than
    # max_context times this are refused before they are tokenized (prompt_bound.py).
    max_token_chars: int | None = None
    # Whether it serves GenerationRequest.loop (per-token readings, targets, rules).
    closed_loop: bool = False
    # The steering operators its plans may carry (server/steering/operators.py).
    operators: tuple[str, ...] = ("add",)
    # How many ablates and caps a plan may apply at one block (None: any number).
    edits_per_block: int | None = None
    # The token ids it accepts in stop_token_ids are below this (None: it checks none).
    vocab_size: int | None = None

    def why_unsteerable(self, layer: int) -> str:
        """`` (reason)`` for a block of the model that cannot be steered, else nothing."""
        inside = 0 <= layer < self.num_layers and layer not in self.steerable_layers
        return f" ({self.unsteerable_note})" if inside and self.unsteerable_note else ""


@runtime_checkable
class Backend(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream the generation; closing the iterator early cancels the request. A request the
        engine fails through no fault of its own raises ``server.errors.EngineFault`` (``EngineDied``
        once the engine can serve no more)."""
        ...

    def failure(self) -> str | None:
        """Why the engine can no longer serve (its process or thread died), or None while it can.
        Cheap: the server asks every second (serving/engine_supervisor.py)."""
        ...

    def answer_ids(self, text: str) -> list[int]:
        """The token ids of ``text`` as this model would write it after a prompt (no special
        tokens): how another model's answer is read back through this one."""
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
