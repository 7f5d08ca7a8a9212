"""Monitoring an answer while vLLM generates it: the workers sum the monitored blocks' outputs at the
answer's positions as they are fed back, instead of a read-back of prompt and answer afterwards.

Allowed where the sums equal the unsteered read-back's (nothing steered up to the monitored blocks,
as on the other engines), for one answer per request. The last token's outputs are computed only
when it is fed back: vLLM is asked for one token more than the answer may have (when the context has
room), and the final chunk waits for the step that feeds it; where vLLM stopped first (an
end-of-sequence id) that one position is read back alone, its prefix from vLLM's prefix cache.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from server.engine.base import GenerationRequest, ModelInfo
from server.engine.read_back import in_flight_capture, leading_blocks
from server.engine.sequence import ResponseCapture, Sequence
from server.engine.vllm.read_backs import Probe, Rpc
from server.engine.vllm.wire import CaptureSpec, unpack
from server.steering.plan import Positions


class InFlightMonitor:
    """One answer's in-flight capture: its extra args, then ``means`` once the answer ended."""

    def __init__(
        self, sequence: Sequence, num_blocks: int, rpc: Rpc, tail: tuple[dict[str, Any], str | None]
    ) -> None:
        self._sequence = sequence
        self._spec = CaptureSpec(uuid.uuid4().hex, len(sequence.prompt_ids), num_blocks, in_flight=True)
        self._rpc = rpc
        self._tail = tail  # (steering, cache salt) under which the last position may be read back
        self._taken = False
        sequence.capture = ResponseCapture(num_blocks)  # the final chunk waits for the means

    def extra_args(self) -> dict[str, object]:
        return self._spec.to_extra_args()

    async def means(self, probe: Probe, max_context: int) -> np.ndarray | None:
        """The mean monitored outputs over the answer's tokens (None: the capture was spoiled, and the
        answer is read back as on an engine without this)."""
        tokens = self._sequence.prompt_ids + self._sequence.output_ids
        self._taken = True
        parts = await self._rpc("persona_take_capture", (self._spec.token, len(tokens)))
        part = next((part for part in parts if part is not None), None)
        if part is None:
            return None
        blocks, sums, count = self._spec.num_blocks, None, 0
        if part["sums"]:
            sums = np.stack([unpack(part["sums"][layer], np.float64) for layer in range(blocks)])
            count = int(part["counts"][0])
        if not part["seen_last"]:
            if len(tokens) + 1 > max_context:
                return None
            steering, salt = self._tail
            last = (await probe(tokens, steering, salt, blocks)).astype(np.float64)
            sums, count = (last if sums is None else sums + last), count + 1
        assert sums is not None
        return (sums / count).astype(np.float32)

    async def drop(self) -> None:
        """Forget the capture of an answer that ended without its means (failed or cancelled)."""
        if not self._taken:
            self._taken = True
            await self._rpc("persona_take_capture", (self._spec.token,))


def in_flight_monitor(
    sequence: Sequence,
    request: GenerationRequest,
    info: ModelInfo,
    rpc: Rpc,
    tail: tuple[dict[str, Any], str | None],
    salt_is_own: bool,
) -> InFlightMonitor | None:
    """The answer's in-flight monitor, where it can have one (on one pipeline stage: the caller's
    check, as the capture is taken from one worker). ``tail``: the steering and cache salt of
    the answer's request; ``salt_is_own``: whether no other request shares that salt (a closed loop's).

    Reading the last position back must not leave KV cache under a shared salt that differs from what
    the salt's own requests compute: so the plan must steer every position alike (positions ``all``),
    or the salt be the answer's own (then the read-back runs unsteered: the monitored blocks do not
    depend on the steering past them)."""
    if request.monitor_blocks is None or request.n != 1:
        return None
    loop = sequence.loop.spec if sequence.loop is not None else None
    if in_flight_capture(request.monitor_blocks, sequence.plan, loop, info.num_layers) is None:
        return None
    if salt_is_own:
        tail = ({}, tail[1])
    elif sequence.plan is not None and sequence.plan.positions != Positions.ALL:
        return None
    return InFlightMonitor(sequence, leading_blocks(request.monitor_blocks, info.num_layers), rpc, tail)
