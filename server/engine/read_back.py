"""The rules of reading an answer back through a model (monitoring, likelihood), for every engine."""

from __future__ import annotations

from server.engine.base import EngineError
from server.engine.sequence import ResponseCapture
from server.steering.closed_loop import LoopSpec
from server.steering.plan import SteeringPlan


def answer_tokens(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], int]:
    """Prompt and response ids of an answer to read back, and where the response starts."""
    if not response_ids:
        raise EngineError("an empty response cannot be read back")
    return prompt_ids + list(response_ids), len(prompt_ids)


def leading_blocks(num_blocks: int | None, num_layers: int) -> int:
    """How many leading blocks to read: ``num_blocks`` within 1..num_layers, all when None."""
    return num_layers if num_blocks is None else min(max(num_blocks, 1), num_layers)


def in_flight_capture(
    monitor_blocks: int | None, plan: SteeringPlan | None, loop: LoopSpec | None, num_layers: int
) -> ResponseCapture | None:
    """A capture of the monitored blocks while generating, when it equals the unsteered read-back:
    no steering on those blocks or before them (a block's output depends only on the blocks up to it)."""
    if monitor_blocks is None:
        return None
    blocks = leading_blocks(monitor_blocks, num_layers)
    edited = set(plan.edits) if plan is not None else set()
    steered = set(plan.deltas if plan is not None else ()) | edited | (loop.steered_blocks if loop else set())
    if min(steered, default=num_layers) < blocks:
        return None
    return ResponseCapture(blocks)
