"""The rules of reading an answer back through a model (monitoring, likelihood), for every engine."""

from __future__ import annotations

from server.engine.base import EngineError


def answer_tokens(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], int]:
    """Prompt and response ids of an answer to read back, and where the response starts."""
    if not response_ids:
        raise EngineError("an empty response cannot be read back")
    return prompt_ids + list(response_ids), len(prompt_ids)


def leading_blocks(num_blocks: int | None, num_layers: int) -> int:
    """How many leading blocks to read: ``num_blocks`` within 1..num_layers, all when None."""
    return num_layers if num_blocks is None else min(max(num_blocks, 1), num_layers)
