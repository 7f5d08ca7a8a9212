"""OpenAI response objects and SSE framing for chat and text completions."""

from __future__ import annotations

import json
from typing import Any

from server.engine.base import TokenChunk


def usage(chunk: TokenChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def completion_object(
    *, chat: bool, response_id: str, created: int, model: str, text: str, last: TokenChunk, persona: Any
) -> dict[str, Any]:
    finish = last.finish_reason.value if last.finish_reason else None
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(last),
        "persona": persona,
    }


def chunk_object(
    *,
    chat: bool,
    response_id: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None,
    persona: Any,
    first: bool = False,
) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "finish_reason": finish_reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "persona": persona,
    }


def usage_chunk(
    *, chat: bool, response_id: str, created: int, model: str, last: TokenChunk
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(last),
    }


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
