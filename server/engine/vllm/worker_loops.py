"""Closed loops inside a vLLM worker: each loop request's ``SteeringLoop``, run where the forward is.

The front end sees a step's tokens only after the next step may already be scheduled, too late to set
its strengths; so the loop runs in the worker. In each forward a loop request's prompt rows get its
prompt steering (the request's plan, and the rules that fired on its prompt), its generated rows the
loop's additions of the current pass, and the row that chooses its next token (the last prompt token,
then each generated token fed back) is read at the loop's blocks, after the steering, to set the next
pass. The traces wait here until the front end takes them (``take``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.vllm.loop_wire import LOOP_KEY, LoopRef, trace_out
from server.steering.closed_loop import SteeringLoop
from server.steering.plan import Positions, steered_position_mask

Vectors = dict[int, torch.Tensor]


@dataclass
class LoopState:
    ref: LoopRef
    loop: SteeringLoop
    traces: list[list[Any]] = field(default_factory=list)  # not yet taken by the front end


@dataclass
class LoopRead:
    """A loop's reading in this forward: the chosen row's outputs at blocks ``0..num_blocks-1``."""

    state: LoopState
    row: int  # flat row in the forward's batch
    additions: dict[int, torch.Tensor] | None  # what the pass added, when not the loop's own deltas
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def take(self, layer: int, stream: torch.Tensor) -> None:
        """Block ``layer``'s residual stream [tokens, hidden]; after the last block read, the loop
        observes the pass and sets the next one."""
        loop = self.state.loop
        num_blocks = loop.spec.num_blocks
        if layer >= num_blocks:
            return
        self.outputs[layer] = stream[self.row]
        if layer == num_blocks - 1:
            outputs = torch.stack([self.outputs[block] for block in range(num_blocks)]).float().cpu()
            self.state.traces.append(trace_out(loop.observe(outputs, self.additions)))


class WorkerLoops:
    """The loops of the requests a worker runs, by token, from first sight until the front end closes
    them."""

    def __init__(self) -> None:
        self._states: dict[str, LoopState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def state_for(self, extra_args: dict[str, Any] | None) -> LoopState | None:
        entry = (extra_args or {}).get(LOOP_KEY)
        if not isinstance(entry, dict):
            return None
        state = self._states.get(str(entry["token"]))
        if state is None:  # decoded once per request, not per forward
            ref = LoopRef.from_extra_args(extra_args)
            assert ref is not None
            state = LoopState(ref, SteeringLoop(ref.spec, ref.progress))
            self._states[ref.token] = state
        return state

    def take(self, token: str, close: bool) -> list[list[Any]] | None:
        """The traces recorded since the last take (None: no such loop here); ``close`` forgets it."""
        state = self._states.pop(token, None) if close else self._states.get(token)
        if state is None:
            return None
        traces, state.traces = state.traces, []
        return traces


def loop_additions(
    state: LoopState,
    plan: tuple[Vectors, str] | None,
    token_positions: torch.Tensor,
    num_prompt_tokens: int,
    like: torch.Tensor,
) -> list[tuple[torch.Tensor, Vectors]]:
    """(offsets into the request's rows, block -> vector) pairs a loop request adds in this forward:
    the plan (``(vectors, positions rule)``) and the prompt-fired rules on prompt rows, the loop's
    current additions on generated rows. ``like``: a tensor of the model's device and dtype."""
    prompt = token_positions < num_prompt_tokens
    parts: list[tuple[torch.Tensor, Vectors]] = []

    def on_prompt(vectors: Vectors, positions: Positions) -> None:
        keep = steered_position_mask(positions, token_positions, num_prompt_tokens) & prompt
        if vectors and bool(keep.any()):
            parts.append((torch.nonzero(keep, as_tuple=False).flatten(), vectors))

    if plan is not None:
        on_prompt(plan[0], Positions(plan[1]))
    rules = state.loop.spec.rules
    for index in state.ref.prompt_rules:
        rule = rules[index]
        on_prompt({b: (v * rule.strength).to(like) for b, v in rule.vectors.items()}, rule.positions)
    generated = torch.nonzero(~prompt, as_tuple=False).flatten()
    deltas = state.loop.deltas()
    if generated.numel() and deltas:
        parts.append((generated, {block: delta.to(like) for block, delta in deltas.items()}))
    return parts


def loop_read(
    state: LoopState,
    plan_vectors: Vectors | None,
    token_positions: torch.Tensor,
    num_prompt_tokens: int,
    last_row: int,
) -> LoopRead | None:
    """The reading this forward owes the loop, when its last row chooses a token: the last prompt
    token (unless the front end read the prompt already) or a generated token fed back."""
    last = int(token_positions[-1])
    if last < num_prompt_tokens - 1:
        return None  # a chunk of a long prompt: no token is chosen from it
    if last == num_prompt_tokens - 1:
        if state.loop.read_prompt:
            return None
        # Every positions rule steers the last prompt token: the pass added the plan there.
        added = {block: v.float().cpu() for block, v in (plan_vectors or {}).items()}
        return LoopRead(state, last_row, added)
    return LoopRead(state, last_row, None)
