"""What the serving layer is asked to do, in its own terms (the API layer maps its protocol onto these)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.engine.base import MAX_LOGPROBS, ChatMessage
from server.steering.closed_loop import DEFAULT_GAIN
from server.steering.plan import Positions

# ChatMessage is part of a completion request (and MAX_LOGPROBS one of its limits): the API takes
# them from here, never from the engine.
__all__ = [
    "MAX_LOGPROBS",
    "ChatMessage",
    "CompletionJob",
    "JsonOutput",
    "PersonaTerm",
    "SteeringOverride",
    "TargetTerm",
    "WhenRule",
]


@dataclass(frozen=True)
class PersonaTerm:
    name: str
    strength: float | None = None  # None: the persona's stored default strength


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
class JsonOutput:
    """The answer must be JSON: any object, or one that follows ``schema``."""

    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class CompletionJob:
    """One chat (``messages``) or text (``prompt``) completion request.

    A text completion may hold several prompts; each gets ``n`` answers, numbered prompt by prompt.
    """

    model: str
    messages: Sequence[ChatMessage] | None = None
    prompt: str | Sequence[str] | None = None
    n: int = 1
    echo: bool = False  # text completions: each answer begins with its prompt
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's and its k likeliest alternatives'
    tokens_as_ids: bool = False  # logprobs name tokens token_id:N
    json_output: JsonOutput | None = None
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
