"""OpenAI response objects of chat and text completions, and their SSE framing.

The pydantic models below define these objects: the API declares them on its routes (so
/openapi.json documents them), and ``ResponseShape`` writes them as JSON-ready dicts. They live
here, not in ``server.api``, because serving writes them and must never import the API.

Some fields are absent from the wire unless set (``persona_scores``, a chunk's ``usage``, a
delta's ``role``), while others are present even when null (``persona``, ``logprobs``): the routes
dump with ``exclude_unset``, never ``exclude_none``, and every always-present field is required
(no default), so that none can vanish.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from server.engine.base import TokenChunk

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AppliedPersona(BaseModel):
    """A persona that steered the answer, as it was applied."""

    name: str
    strength: float = Field(description="The strength used: the request's, else the persona's default.")
    version: int = Field(description="The persona version that steered.")
    layers: list[int] = Field(description="The decoder blocks that were steered.")


PersonaEcho = Annotated[
    AppliedPersona | list[AppliedPersona] | None,
    Field(description="The persona applied (a list when the request composed several); null if none."),
]
PersonaScores = Annotated[
    dict[str, float] | None,
    Field(description="Trait score of the answer per persona of `persona_monitor`; absent unless asked."),
]
Logprobs = Annotated[None, Field(description="Log probabilities are not supported: always null.")]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: Logprobs


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="On the first chunk only.")
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: Logprobs


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: Logprobs


class _Envelope(BaseModel):
    id: str
    object: str
    created: int = Field(description="Unix time, in seconds.")
    model: str


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    persona: PersonaEcho
    persona_scores: PersonaScores = None


class TextCompletion(_Envelope):
    object: Literal["text_completion"]
    choices: list[TextChoice]
    usage: Usage
    persona: PersonaEcho
    persona_scores: PersonaScores = None


_USAGE_CHUNK = "Only on the last chunk before [DONE], if stream_options.include_usage asked (choices: [])."
_CHUNK_PERSONA = "The persona applied (a list if composed; null if none): on every chunk but the usage chunk."


class ChatCompletionChunk(_Envelope):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    persona: PersonaEcho = Field(None, description=_CHUNK_PERSONA)
    persona_scores: PersonaScores = Field(None, description="On the chunk that finishes, when asked.")
    usage: Usage | None = Field(None, description=_USAGE_CHUNK)


class CompletionChunk(_Envelope):
    """One server-sent event of a streamed text completion."""

    object: Literal["text_completion"]
    choices: list[TextChoice]
    persona: PersonaEcho = Field(None, description=_CHUNK_PERSONA)
    persona_scores: PersonaScores = Field(None, description="On the chunk that finishes, when asked.")
    usage: Usage | None = Field(None, description=_USAGE_CHUNK)


# What a streamed response's events hold, for the API's documentation of its event streams.
STREAM_CHUNKS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, CompletionChunk)


def usage(chunk: TokenChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


@dataclass(frozen=True)
class ResponseShape:
    """What every object of one response shares: its kind, id, creation time and model.

    It writes the models above as plain dicts, in their field order: a streamed answer makes one
    chunk per token, and building and dumping a pydantic model costs about ten times as much as
    the dict (tests/test_openapi.py validates what this writes against the models).
    """

    chat: bool
    response_id: str
    created: int
    model: str

    def _envelope(self, streamed: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = (
            ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        )
        return {"id": self.response_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def _choice(
        self, text: str, finish_reason: str | None, *, delta: dict[str, Any] | None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text
        elif delta is not None:
            choice["delta"] = delta
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return {**choice, "finish_reason": finish_reason, "logprobs": None}

    def completion(
        self, text: str, last: TokenChunk, persona: Any, scores: dict[str, float] | None = None
    ) -> dict[str, Any]:
        finish = last.finish_reason.value if last.finish_reason else None
        body = self._envelope(False, [self._choice(text, finish, delta=None)])
        body = {**body, "usage": usage(last), "persona": persona}
        return body if scores is None else {**body, "persona_scores": scores}

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        persona: Any,
        first: bool = False,
        scores: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        delta["content"] = text
        body = {**self._envelope(True, [self._choice(text, finish_reason, delta=delta)]), "persona": persona}
        return body if scores is None else {**body, "persona_scores": scores}

    def usage_chunk(self, last: TokenChunk) -> dict[str, Any]:
        return {**self._envelope(True, []), "usage": usage(last)}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
