"""A closed-loop answer on vLLM, from the front end: the request's loop sent to the workers, its traces
taken back in token order.

The loop itself runs in the worker (worker_loops.py). What the worker cannot do is run a prompt twice:
when a rule fires on the prompt's reading, the answer must start from the prompt steered by the rule's
persona too (as on the HF engine). So a request with rules first runs its prompt once, steered by its
plan, for one token (a probe, sharing the plan's prefix cache), reads the last position here, and sends
the loop on with that reading taken and the rules that fired added to its prompt.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import deque
from typing import Any

import torch

from server.engine.base import EngineError
from server.engine.sequence import Sequence
from server.engine.vllm.loop_wire import LoopRef, trace_in
from server.engine.vllm.read_backs import Probe
from server.engine.vllm.trace_taker import TraceTaker
from server.steering.closed_loop import TokenTrace


class LoopRun:
    """One answer's loop on the workers: ``extra_args`` and ``cache_salt`` for its request, then
    ``traces(count)`` after each output and ``close`` when it ends."""

    def __init__(self, taker: TraceTaker, ref: LoopRef, first: TokenTrace | None, salt: str | None) -> None:
        self._taker = taker
        self.ref = ref
        self._pending: deque[TokenTrace] = deque([first] if first is not None else [])
        # A target or a rule steers generated tokens by what the answer does: no other request may
        # reuse its KV cache (nor it another's past the prompt).
        self.owns_salt = ref.spec.target is not None or bool(ref.spec.rules)
        self.cache_salt = f"persona-loop:{ref.token}" if self.owns_salt else salt

    def extra_args(self) -> dict[str, object]:
        return self.ref.to_extra_args()

    async def traces(self, count: int) -> list[TokenTrace]:
        """The next ``count`` tokens' traces (the workers record each in the pass that chose it, before
        vLLM hands the token out)."""
        if len(self._pending) < count:
            self._pending.extend(await self._take(close=False))
        if len(self._pending) < count:
            raise EngineError(f"the workers hold {len(self._pending)} token traces, wanted {count}")
        return [self._pending.popleft() for _ in range(count)]

    async def close(self) -> None:
        await self._take(close=True)

    async def _take(self, close: bool) -> list[TokenTrace]:
        return [trace_in(trace) for trace in await self._taker.take(self.ref.token, close)]


async def open_loop(
    sequence: Sequence, probe: Probe, taker: TraceTaker, steering: dict[str, Any], salt: str | None
) -> LoopRun:
    """The loop of ``sequence`` ready to run on the workers; ``steering`` and ``salt``: its plan's
    extra args and cache salt (the prompt's steering)."""
    loop = sequence.loop
    assert loop is not None
    token = uuid.uuid4().hex
    if not loop.spec.rules:
        return LoopRun(taker, LoopRef(token, loop.spec), None, salt)
    plan = sequence.plan
    last = await probe(sequence.prompt_ids, steering, salt, loop.spec.num_blocks)
    trace = loop.observe(torch.from_numpy(last), plan.deltas if plan is not None else {})
    fired = loop.rules_on
    if fired:  # they steer the prompt, at their personas' own positions, and the first token
        loop.rerun()
        trace = dataclasses.replace(trace, rules=fired)
    return LoopRun(taker, LoopRef(token, loop.spec, loop.progress(), fired), trace, salt)
