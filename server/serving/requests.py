"""What the serving layer is asked to do, in its own terms (the API layer maps its protocol onto these)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.base import ChatMessage
from server.steering.plan import Positions

# ChatMessage is part of a completion request: the API builds it from here, never from the engine.
__all__ = ["ChatMessage", "CompletionJob", "PersonaTerm", "SteeringOverride"]


@dataclass(frozen=True)
class PersonaTerm:
    name: str
    strength: float | None = None  # None: the persona's stored default strength


@dataclass(frozen=True)
class SteeringOverride:
    layers: tuple[int, ...] | None = None  # a subset of the persona's layers
    positions: Positions | None = None


@dataclass(frozen=True)
class CompletionJob:
    """One chat (``messages``) or text (``prompt``) completion request."""

    model: str
    messages: Sequence[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    persona: str | Sequence[PersonaTerm] | None = None
    persona_strength: float | None = None
    steering: SteeringOverride | None = None
    persona_monitor: tuple[str, ...] = ()  # personas whose trait score the answer reports

    @property
    def is_chat(self) -> bool:
        return self.messages is not None
