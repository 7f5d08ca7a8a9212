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

import numpy as np
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
    """A loop's reading in this forward: the block outputs at the token that chooses its next one."""

    state: LoopState
    token: int  # flat index of that token in the forward's batch
    additions: dict[int, torch.Tensor] | None  # what the pass added, when not the loop's own deltas

    def observe(self, outputs: np.ndarray) -> None:
        """Blocks ``0..num_blocks-1``'s residual stream at the token [num_blocks, hidden]: the loop
        observes the pass and sets the next one."""
        trace = self.state.loop.observe(torch.from_numpy(outputs).float(), self.additions)
        self.state.traces.append(trace_out(trace))


@dataclass(frozen=True)
class LoopPart:
    """Tokens of a loop request that add the same vectors in this forward; ``fresh``: vectors that
    change from pass to pass (the loop's own), written again every forward."""

    offsets: np.ndarray  # into the request's tokens in this forward
    name: str
    vectors: Vectors
    fresh: bool = False


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


def loop_parts(
    state: LoopState, plan: tuple[Vectors, str] | None, token_positions: np.ndarray, num_prompt_tokens: int
) -> list[LoopPart]:
    """What a loop request adds in this forward, as parts that do not overlap: on prompt tokens the
    plan (``(vectors, positions rule)``) and the prompt-fired rules, each at its own positions and
    summed where they meet; on generated tokens the loop's current additions."""
    positions = torch.from_numpy(token_positions)
    prompt = token_positions < num_prompt_tokens
    components: list[tuple[np.ndarray, Vectors]] = []

    def on_prompt(vectors: Vectors, rule: Positions) -> None:
        keep = steered_position_mask(rule, positions, num_prompt_tokens).numpy() & prompt
        if vectors and keep.any():
            components.append((keep, vectors))

    if plan is not None:
        on_prompt({b: v.float() for b, v in plan[0].items()}, Positions(plan[1]))
    rules = state.loop.spec.rules
    for index in state.ref.prompt_rules:
        rule = rules[index]
        on_prompt({b: v * rule.strength for b, v in rule.vectors.items()}, rule.positions)
    parts: list[LoopPart] = []
    which = np.zeros(len(token_positions), dtype=np.int64)  # bit i: component i steers the token
    for bit, (keep, _) in enumerate(components):
        which[keep] |= 1 << bit
    for combination in np.unique(which[which > 0]):
        summed: Vectors = {}
        for bit, (_, vectors) in enumerate(components):
            if combination >> bit & 1:
                for block, vector in vectors.items():
                    summed[block] = summed[block] + vector if block in summed else vector
        parts.append(LoopPart(np.flatnonzero(which == combination), f"prompt:{combination}", summed))
    generated = np.flatnonzero(~prompt)
    deltas = state.loop.deltas()
    if generated.size and deltas:
        parts.append(LoopPart(generated, "generated", deltas, fresh=True))
    return parts


def loop_read(
    state: LoopState,
    plan_vectors: Vectors | None,
    token_positions: np.ndarray,
    num_prompt_tokens: int,
    last_token: int,
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
        return LoopRead(state, last_token, added)
    return LoopRead(state, last_token, None)
