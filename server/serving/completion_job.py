"""What the serving layer is asked to do, in its own terms: the OpenAI protocol's completion requests
(``server.serving.protocol.requests``) turn themselves into a ``CompletionJob``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.engine.base import ChatMessage, SamplingParams, StructuredOutput
from server.steering.closed_loop import DEFAULT_GAIN
from server.steering.plan import Positions

# ChatMessage is part of a completion job: its users take it from here, never from the engine.
__all__ = [
    "ChatMessage",
    "CompletionJob",
    "PersonaTerm",
    "SamplingRequest",
    "SteeringOverride",
    "TargetTerm",
    "WhenRule",
]


class SamplingRequest(Protocol):
    """What a request asks of sampling, before the server's defaults; the protocol's completion
    requests are one. A sampling field lives there and in the engine's ``SamplingParams`` only."""

    @property
    def max_tokens(self) -> int | None:
        """As asked (None: the server's default, and the answer may stop at the context window)."""

    def logprob_count(self) -> int | None:
        """Alternatives per token whose log-probabilities are asked for (None: no logprobs)."""

    def structured_output(self) -> StructuredOutput | None:
        """The JSON every answer must be, if any."""

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters, ``default_max_tokens`` standing in for a max_tokens not
        asked for."""


@dataclass(frozen=True)
class PersonaTerm:
    name: str
    strength: float | None = None  # None: the persona's stored default strength (add) or 1 (ablate)
    operator: str = "add"  # add, ablate or cap (server/steering/operators.py)
    cap_max: float | None = None  # a cap's bounds, in the units of the per-block readings
    cap_min: float | None = None


@dataclass(frozen=True)
class TargetTerm:
    """Hold persona ``name``'s reading at ``score``, the strength chosen token by token."""

    name: str
    score: float
    strength: float | None = None  # the prompt's (default: the persona's default strength)
    max_strength: float | None = None  # default: the persona's default strength, within the server's limit
    gain: float = DEFAULT_GAIN


@dataclass(frozen=True)
class WhenRule:
    """While ``monitor``'s reading is above (or below) ``threshold``, steer with ``steer``."""

    monitor: str
    threshold: float
    above: bool
    steer: PersonaTerm
    for_tokens: int | None = None


@dataclass(frozen=True)
class SteeringOverride:
    layers: tuple[int, ...] | None = None  # a subset of the persona's layers
    positions: Positions | None = None


@dataclass(frozen=True)
class CompletionJob:
    """One chat (``messages``) or text (``prompt``) completion request.

    A text completion may hold several prompts; each gets ``n`` answers, numbered prompt by prompt.
    """

    model: str
    sampling: SamplingRequest
    messages: Sequence[ChatMessage] | None = None
    prompt: str | Sequence[str] | None = None
    n: int = 1
    echo: bool = False  # text completions: each answer begins with its prompt
    tokens_as_ids: bool = False  # logprobs name tokens token_id:N
    stream: bool = False
    include_usage: bool = False
    persona: str | Sequence[PersonaTerm] | None = None
    persona_strength: float | None = None
    steering: SteeringOverride | None = None
    persona_monitor: tuple[str, ...] = ()  # personas whose trait score the answer reports
    monitor_tokens: bool = False  # and each token's reading of them
    persona_target: TargetTerm | None = None
    persona_when: tuple[WhenRule, ...] = ()

    @property
    def closed_loop(self) -> bool:
        """Whether the job reads the model as it writes (token scores, a target, rules)."""
        return self.monitor_tokens or self.persona_target is not None or bool(self.persona_when)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def prompts(self) -> list[str | None]:
        """The prompts to answer (one None for a chat)."""
        if self.prompt is None or isinstance(self.prompt, str):
            return [self.prompt]
        return list(self.prompt)
