"""A request's prompt as token ids, through a transformers tokenizer and its chat template.

The HF and vLLM engines render prompts here, so the same request becomes the same tokens on both.
"""

from __future__ import annotations

from typing import Any

from server.engine.base import EngineError, GenerationRequest, ModelInfo
from server.engine.prompt_bound import check_prompt_length


def prompt_ids(tokenizer: Any, request: GenerationRequest, info: ModelInfo) -> list[int]:
    """Raw text as the tokenizer encodes it, or messages via the chat template; a text too long
    for the context is refused before it is tokenized."""
    if request.messages is not None and not tokenizer.chat_template:
        raise EngineError(f"model {info.id} has no chat template; use the completions endpoint")
    try:
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = request.prompt or ""
    except Exception as exc:  # a template that refuses the roles
        raise EngineError(f"the prompt cannot be rendered for model {info.id}: {exc}") from exc
    check_prompt_length(text, info.max_token_chars, info.max_context)
    try:
        if request.messages is not None:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(text)["input_ids"])
    except Exception as exc:  # text the tokenizer cannot encode
        raise EngineError(f"the prompt cannot be rendered for model {info.id}: {exc}") from exc


def answer_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` as response tokens: encoded without the special tokens a prompt starts with."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    """The ids that end a generation: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids
