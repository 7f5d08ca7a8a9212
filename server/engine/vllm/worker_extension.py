"""Methods persona-server adds to every vLLM worker (``worker_extension_cls``), called from the front
end with ``collective_rpc``: start steering, hold and drop vector sets, take reads, report.

This is the one module that reads vLLM's model-runner internals (V1 runner: ``input_batch.req_ids``,
``num_computed_tokens_cpu``, ``query_start_loc``, ``requests[id].sampling_params.extra_args``, and
``_model_forward``, which vLLM documents as the place to wrap the model's execution). Importing it
registers our model loader (steered_loader.py), which the worker does before it loads the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.engine.vllm import steered_loader  # noqa: F401  (registers the loader in this process)
from server.engine.vllm.capture import WorkerCaptures
from server.engine.vllm.in_graph import buffers_of
from server.engine.vllm.wire import CaptureSpec, SteeringRef
from server.engine.vllm.worker_steering import BatchRow, WorkerSteering


def _around_forward(steering: WorkerSteering, forward: Callable[..., Any]) -> Callable[..., Any]:
    """The runner's model call with this forward's steering written before it and its reads taken
    after it, outside the compiled model (and outside any CUDA graph it replays)."""

    def steered_forward(*args: Any, **kwargs: Any) -> Any:
        reads = steering.before_forward()
        output = forward(*args, **kwargs)
        steering.after_forward(reads)
        return output

    return steered_forward


def _runs_compiled(model: Any) -> bool:
    """Whether vLLM runs the decoder stack through its compiled function (traced here, or loaded
    from its compile cache), not eagerly."""
    inner = getattr(model, "model", None)
    if inner is None or getattr(inner, "do_not_compile", True):
        return False
    return bool(getattr(inner, "compiled", False) or getattr(inner, "aot_compiled_fn", None) is not None)


class PersonaWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    model_runner: Any
    vllm_config: Any

    def _persona_rows(self) -> list[BatchRow]:
        runner = self.model_runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        bounds = runner.query_start_loc.np[: num_reqs + 1].tolist()
        computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()
        loops = self._persona_steering.loops
        rows = []
        for index, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests[req_id]
            extra_args = state.sampling_params.extra_args if state.sampling_params is not None else None
            rows.append(
                BatchRow(
                    bounds[index],
                    bounds[index + 1],
                    state.num_prompt_tokens,
                    int(computed[index]),
                    SteeringRef.from_extra_args(extra_args),
                    CaptureSpec.from_extra_args(extra_args),
                    loops.state_for(extra_args),
                )
            )
        return rows

    def persona_setup(self) -> dict[str, Any]:
        """Start steering: each forward of the runner writes the steering buffers first (once)."""
        existing = getattr(self, "_persona_steering", None)
        if existing is not None:
            return self._persona_summary()
        runner = self.model_runner
        model = runner.get_model()
        buffers = buffers_of(model)
        if buffers is None:
            raise RuntimeError("the model was not loaded by persona-server's loader: no steering buffers")
        steering = WorkerSteering(buffers, buffers.owned_layers, self._persona_rows, WorkerCaptures())
        self._persona_steering = steering
        runner._model_forward = _around_forward(steering, runner._model_forward)
        return self._persona_summary()

    def _persona_summary(self) -> dict[str, Any]:
        return {
            "num_layers": int(self._persona_steering.num_layers),
            "owned_layers": list(self._persona_steering.owned_layers),
            "compilation_mode": int(self.vllm_config.compilation_config.mode),
            "enforce_eager": bool(self.vllm_config.model_config.enforce_eager),
            "compiled": _runs_compiled(self.model_runner.get_model()),
        }

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
            **self._persona_summary(),
            "steered_rows": steering.steered_rows,
            "missing_sets": steering.missing_sets,
            "unslotted": steering.unslotted,
            "held_sets": steering.held_sets,
            "loops": len(steering.loops),
            "captures": len(steering.captures),
        }
