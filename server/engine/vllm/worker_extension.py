"""Methods persona-server adds to every vLLM worker (``worker_extension_cls``), called from the front
end with ``collective_rpc``: install the block hooks, hold and drop vector sets, report.

This is the one module that reads vLLM's model-runner internals (V1 runner: ``input_batch.req_ids``,
``query_start_loc``, ``requests[id].sampling_params.extra_args``); the backend pins that runner and
eager mode, and a test fails if the hooks stop firing.
"""

from __future__ import annotations

from typing import Any

from server.engine.vllm.capture import WorkerCaptures
from server.engine.vllm.wire import CaptureSpec, SteeringRef
from server.engine.vllm.worker_steering import BatchRow, WorkerSteering


def _forward_identity() -> object | None:
    """The forward context under way, or None outside a forward or in a dummy/profiling run."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    context = get_forward_context()
    return context if context.attn_metadata else None


def _decoder_blocks(model: Any) -> Any:
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if blocks is None:
        raise RuntimeError(f"{type(model).__name__}: no model.layers to steer")
    return blocks


class PersonaWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    model_runner: Any

    def _persona_rows(self) -> list[BatchRow]:
        runner = self.model_runner
        num_reqs = runner.input_batch.num_reqs
        bounds = runner.query_start_loc.np[: num_reqs + 1].tolist()
        loops = self._persona_steering.loops
        rows = []
        for index, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            state = runner.requests[req_id]
            extra_args = state.sampling_params.extra_args if state.sampling_params is not None else None
            rows.append(
                BatchRow(
                    bounds[index],
                    bounds[index + 1],
                    state.num_prompt_tokens,
                    SteeringRef.from_extra_args(extra_args),
                    CaptureSpec.from_extra_args(extra_args),
                    loops.state_for(extra_args),
                )
            )
        return rows

    def persona_setup(self) -> dict[str, Any]:
        """Install the hooks on the blocks this worker owns (all of them, or its pipeline stage's)."""
        from vllm.model_executor.models.utils import PPMissingLayer

        existing = getattr(self, "_persona_steering", None)
        if existing is not None:
            existing.remove()
        blocks = _decoder_blocks(self.model_runner.get_model())
        owned = [index for index, block in enumerate(blocks) if not isinstance(block, PPMissingLayer)]
        captures = WorkerCaptures()
        steering = WorkerSteering(blocks, owned, self._persona_rows, _forward_identity, captures)
        steering.install()
        self._persona_steering = steering
        return {"num_layers": len(blocks), "owned_layers": owned}

    def persona_load(self, key: str, vectors: dict[int, bytes]) -> None:
        self._persona_steering.load(key, vectors)

    def persona_drop(self, keys: list[str]) -> None:
        self._persona_steering.drop(keys)

    def persona_take_capture(self, token: str, end: int | None = None) -> dict[str, Any] | None:
        """What a read-back request, or an answer monitored in flight (cut before position ``end``),
        left behind on this worker's blocks (then forgotten)."""
        return self._persona_steering.captures.take(token, end)

    def persona_loop_take(self, asked: list[tuple[str, bool]]) -> dict[str, list[list[Any]]]:
        """For each (token, close) asked: the token traces that closed-loop request recorded since its
        last take, if this worker runs it; ``close`` forgets it."""
        loops = self._persona_steering.loops
        taken = {token: loops.take(token, close) for token, close in asked}
        return {token: traces for token, traces in taken.items() if traces is not None}

    def persona_stats(self) -> dict[str, Any]:
        steering = self._persona_steering
        return {
            "steered_rows": steering.steered_rows,
            "missing_sets": steering.missing_sets,
            "held_sets": steering.held_sets,
            "owned_layers": list(steering.owned_layers),
            "loops": len(steering.loops),
            "captures": len(steering.captures),
        }
