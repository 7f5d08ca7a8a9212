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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from server.engine.base import TokenChunk, TokenLogprob

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AppliedPersona(BaseModel):
    """A persona that steered the answer, as it was applied."""

    name: str
    strength: float = Field(
        description="The strength used: the request's, else the persona's default (persona_target: "
        "the mean over the answer's tokens so far)."
    )
    version: int = Field(description="The persona version that steered.")
    layers: list[int] = Field(description="The decoder blocks that were steered.")
    target_score: float | None = Field(None, description="persona_target only: the score it held to.")


class FiredRule(BaseModel):
    """A run of answer tokens that one ``persona_when`` rule steered."""

    rule: int = Field(description="The rule's index in persona_when.")
    token: int = Field(description="The first steered answer token (0-based).")
    tokens: int = Field(description="How many tokens in a row it steered.")


_TOKEN_SCORES = (
    "With persona_monitor_tokens: per monitored persona, each answer token's projection, read in the "
    "forward pass that chose the token at the position it was chosen from, on the steered run minus what "
    "the request's own steering added to the residual stream (unlike persona_scores, which reads the "
    "whole answer back unsteered). A streamed chunk holds its own tokens'."
)
_TARGET_STRENGTHS = "With persona_target: the strength each answer token was chosen under (a chunk: its own)."
_WHEN_FIRED = "With persona_when: each run of tokens a rule steered (on the chunk that finishes)."


class _LoopFields(BaseModel):
    persona_token_scores: dict[str, list[float]] | None = Field(None, description=_TOKEN_SCORES)
    persona_target_strengths: list[float] | None = Field(None, description=_TARGET_STRENGTHS)
    persona_when_fired: list[FiredRule] | None = Field(None, description=_WHEN_FIRED)


PersonaEcho = Annotated[
    AppliedPersona | list[AppliedPersona] | None,
    Field(description="The persona applied (a list when the request composed several); null if none."),
]
PersonaScores = Annotated[
    dict[str, float] | None,
    Field(description="Trait score of the answer per persona of `persona_monitor`; absent unless asked."),
]
_LOGPROBS = (
    "Log-probabilities of the answer's tokens under the steered model, before penalties, temperature "
    "and truncation (vLLM's raw_logprobs); null unless asked."
)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM writes this for a token of probability 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class TextLogprobs(BaseModel):
    """The legacy completions shape: one entry per token in each list."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] = Field(
        description="The likeliest alternatives of each token, and the token itself."
    )
    text_offset: list[int] = Field(description="Where each token's text starts in the choice's text.")


ChatLogprobsField = Annotated[ChatLogprobs | None, Field(description=_LOGPROBS)]
TextLogprobsField = Annotated[TextLogprobs | None, Field(description=_LOGPROBS)]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobsField


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="On the first chunk only.")
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobsField


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: TextLogprobsField


class _Envelope(BaseModel):
    id: str
    object: str
    created: int = Field(description="Unix time, in seconds.")
    model: str


class ChatCompletion(_Envelope, _LoopFields):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    persona: PersonaEcho
    persona_scores: PersonaScores = None


class TextCompletion(_Envelope, _LoopFields):
    object: Literal["text_completion"]
    choices: list[TextChoice]
    usage: Usage
    persona: PersonaEcho
    persona_scores: PersonaScores = None


_USAGE_CHUNK = "Only on the last chunk before [DONE], if stream_options.include_usage asked (choices: [])."
_CHUNK_PERSONA = "The persona applied (a list if composed; null if none): on every chunk but the usage chunk."


class ChatCompletionChunk(_Envelope, _LoopFields):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    persona: PersonaEcho = Field(None, description=_CHUNK_PERSONA)
    persona_scores: PersonaScores = Field(None, description="On the chunk that finishes, when asked.")
    usage: Usage | None = Field(None, description=_USAGE_CHUNK)


class CompletionChunk(_Envelope, _LoopFields):
    """One server-sent event of a streamed text completion."""

    object: Literal["text_completion"]
    choices: list[TextChoice]
    persona: PersonaEcho = Field(None, description=_CHUNK_PERSONA)
    persona_scores: PersonaScores = Field(None, description="On the chunk that finishes, when asked.")
    usage: Usage | None = Field(None, description=_USAGE_CHUNK)


# What a streamed response's events hold, for the API's documentation of its event streams.
STREAM_CHUNKS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, CompletionChunk)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


@dataclass(frozen=True)
class LogprobWriter:
    """Writes logprobs in the OpenAI shapes; with ``token_ids`` (vLLM's return_tokens_as_token_ids)
    a token is named ``token_id:N``, which no two tokens share."""

    token_ids: bool = False

    def _name(self, token_id: int, text: str) -> str:
        return f"token_id:{token_id}" if self.token_ids else text

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        content = []
        for e in entries:
            top = [
                {"token": (name := self._name(i, t)), "logprob": _floor(lp), "bytes": _utf8(name)}
                for i, t, lp in e.top
            ]
            token = self._name(e.token_id, e.token)
            content.append(
                {"token": token, "logprob": _floor(e.logprob), "bytes": _utf8(token), "top_logprobs": top}
            )
        return {"content": content, "refusal": None}

    def _alternatives(self, entry: TokenLogprob) -> dict[str, float]:
        """The likeliest tokens and the token itself (as vLLM writes them)."""
        top = {self._name(i, t): _floor(lp) for i, t, lp in entry.top}
        return {**top, self._name(entry.token_id, entry.token): _floor(entry.logprob)}

    def text(self, entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
        """The legacy shape; ``offset`` is where the first token's text starts in the choice's text."""
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        return {
            "tokens": [self._name(e.token_id, e.token) for e in entries],
            "token_logprobs": [_floor(e.logprob) for e in entries],
            "top_logprobs": [
                {
                    **{self._name(i, t): _floor(lp) for i, t, lp in e.top},
                    self._name(e.token_id, e.token): _floor(e.logprob),
                }
                for e in entries
            ],
            "text_offset": offsets,
        }


@dataclass
class Answer:
    """One choice of a response, as it was generated."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    completion_tokens: int = 0
    parts: list[str] = field(default_factory=list)

    def add(self, chunk: TokenChunk) -> None:
        self.parts.append(chunk.text)
        if chunk.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(chunk.logprobs)  # in place: a copy per token is quadratic
        self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason.value
            self.text = "".join(self.parts)


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
    logprobs: LogprobWriter = LogprobWriter()

    def _envelope(self, streamed: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = (
            ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        )
        return {
            "id": self.response_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _logprobs(self, entries: Sequence[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
        if entries is None:
            return None
        return self.logprobs.chat(entries) if self.chat else self.logprobs.text(entries, offset)

    def _choice(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        *,
        delta: dict[str, Any] | None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if not self.chat:
            choice["text"] = text
        elif delta is not None:
            choice["delta"] = delta
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return {**choice, "finish_reason": finish_reason, "logprobs": logprobs}

    def completion(
        self,
        answers: Sequence[Answer],
        totals: dict[str, int],
        persona: Any,
        scores: dict[str, float] | None = None,
        echo: Sequence[str] = (),
        extras: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The whole response; ``echo``, when the request asked for it, holds each answer's prompt
        text by the answer's index; ``extras``: closed-loop fields."""
        choices = []
        for answer in answers:
            prefix = echo[answer.index] if echo else ""
            logprobs = self._logprobs(answer.logprobs, len(prefix))
            choices.append(
                self._choice(
                    answer.index, prefix + answer.text, answer.finish_reason, delta=None, logprobs=logprobs
                )
            )
        body = {**self._envelope(False, choices), "usage": totals, "persona": persona}
        if scores is not None:
            body["persona_scores"] = scores
        return body if not extras else {**body, **extras}

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        persona: Any,
        first: bool = False,
        scores: dict[str, float] | None = None,
        index: int = 0,
        logprobs: Sequence[TokenLogprob] | None = None,
        offset: int = 0,
        extras: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One event of a streamed choice; ``offset`` is where ``text`` starts in the choice's text;
        ``extras``: closed-loop fields."""
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        delta["content"] = text
        choice = self._choice(
            index, text, finish_reason, delta=delta, logprobs=self._logprobs(logprobs, offset)
        )
        body = {**self._envelope(True, [choice]), "persona": persona}
        if scores is not None:
            body["persona_scores"] = scores
        return body if not extras else {**body, **extras}

    def usage_chunk(self, totals: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(True, []), "usage": totals}


def stream_error(message: str, code: str) -> dict[str, Any]:
    """The event that ends a stream which failed after its first bytes: the OpenAI error object."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
