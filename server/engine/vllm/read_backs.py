"""Reading an answer or a text back through a vLLM model, unsteered: block outputs and likelihood.

A read-back is an ordinary request whose prompt is the tokens to read, with one token to sample. Its
block outputs are summed by the workers' hooks under a capture token (capture.py) and taken with an
RPC when it finishes; its likelihood comes from vLLM's prompt logprobs. A unique cache salt keeps
it off the prefix cache, so every position really runs through the blocks.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from server.engine.base import EngineError, ModelInfo
from server.engine.vllm.faults import as_engine_errors
from server.engine.vllm.wire import CaptureSpec, unpack

Rpc = Callable[[str, tuple[Any, ...]], Awaitable[list[Any]]]
# ReadBacks.steered_last: (prompt ids, extra_args, cache salt, blocks) -> the last position's block
# outputs after steering, [blocks, hidden]
Probe = Callable[[list[int], dict[str, Any], str | None, int], Awaitable[np.ndarray]]


def merge_captures(parts: list[dict[str, Any] | None], num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Each block's mean and last-token output from the workers' captures (tensor-parallel workers
    hold equal copies; pipeline stages hold their own blocks): ([blocks, hidden], [blocks, hidden])."""
    means: dict[int, np.ndarray] = {}
    last: dict[int, np.ndarray] = {}
    for part in parts:
        if part is None:
            continue
        for layer, total in part["sums"].items():
            means.setdefault(int(layer), unpack(total, np.float64) / part["counts"][layer])
        for layer, value in part["last"].items():
            last.setdefault(int(layer), unpack(value, np.float32))
    if sorted(means) != list(range(num_blocks)) or sorted(last) != list(range(num_blocks)):
        raise EngineError(f"the read-back saw blocks {sorted(means)}, wanted 0..{num_blocks - 1}")
    stack = lambda by_layer: np.stack([by_layer[i] for i in range(num_blocks)]).astype(np.float32)  # noqa: E731
    return stack(means), stack(last)


class ReadBacks:
    def __init__(
        self, engine: Any, rpc: Rpc, info: ModelInfo, hooks_ready: Callable[[], Awaitable[None]]
    ) -> None:
        self._engine = engine
        self._rpc = rpc
        self._info = info
        self._hooks_ready = hooks_ready  # the workers' hooks, installed before a capture's request runs

    async def _run(self, tokens: list[int], params: Any, salt: str | None = "") -> Any:
        """One request over ``tokens``; by default under a salt of its own (off the prefix cache)."""
        prompt: dict[str, Any] = {"prompt_token_ids": tokens}
        salt = f"read-back:{uuid.uuid4().hex}" if salt == "" else salt
        if salt is not None:
            prompt["cache_salt"] = salt
        final = None
        outputs = self._engine.generate(prompt, params, request_id=f"read-back-{uuid.uuid4().hex}")
        async for output in as_engine_errors(outputs):
            final = output
        return final

    async def block_outputs(
        self, tokens: list[int], start: int, num_blocks: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean outputs of blocks ``0..num_blocks-1`` over positions ``start:``, and their outputs at the
        last position: ([num_blocks, hidden], [num_blocks, hidden])."""
        from vllm import SamplingParams

        spec = CaptureSpec(token=uuid.uuid4().hex, start=start, num_blocks=num_blocks)
        params = SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, extra_args=spec.to_extra_args()
        )
        return await self._captured(tokens, params, spec)

    async def steered_last(
        self, tokens: list[int], steering: dict[str, Any], salt: str | None, num_blocks: int
    ) -> np.ndarray:
        """Outputs of blocks ``0..num_blocks-1`` at the last position of ``tokens`` run with
        ``steering`` (a request's extra args) and ``salt`` (its cache salt; None: none, so an
        unsteered prompt shares the prefix cache): [num_blocks, hidden]."""
        from vllm import SamplingParams

        spec = CaptureSpec(token=uuid.uuid4().hex, start=len(tokens) - 1, num_blocks=num_blocks)
        extra_args = {**steering, **spec.to_extra_args()}
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args=extra_args)
        _, last = await self._captured(tokens, params, spec, salt)
        return last

    async def _captured(
        self, tokens: list[int], params: Any, spec: CaptureSpec, salt: str | None = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        await self._hooks_ready()  # a read-back may be an engine's first request (an extraction)
        try:
            await self._run(tokens, params, salt)
        finally:  # taken even when the run failed, so no worker keeps it
            parts = await self._rpc("persona_take_capture", (spec.token,))
        return merge_captures(parts, spec.num_blocks)

    async def nll(self, tokens: list[int], start: int) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of tokens ``start:`` given what precedes, unsteered."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0)
        output = await self._run(tokens, params)
        logprobs = output.prompt_logprobs
        total = 0.0
        for position in range(start, len(tokens)):
            total -= logprobs[position][tokens[position]].logprob
        return total, len(tokens) - start
