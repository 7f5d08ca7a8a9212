"""OpenAI response objects and SSE framing for chat and text completions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.engine.base import TokenChunk


def usage(chunk: TokenChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


@dataclass(frozen=True)
class ResponseShape:
    """What every object of one response shares: its kind, id, creation time and model."""

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
