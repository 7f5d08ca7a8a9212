"""vLLM's errors in the engine contract's words: a request vLLM refuses is bad input (EngineError),
a dead engine core or worker is the engine's fault (EngineDied), so the server answers 4xx or 503
and restarts the engine (serving/engine_supervisor.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from server.engine.base import EngineError
from server.errors import EngineDied


async def as_engine_errors(outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """vLLM's outputs; a request vLLM refuses (its own checks of the sampling values) is bad input,
    and a dead engine core is the engine's fault, not the request's."""
    from vllm.exceptions import VLLMClientError

    try:
        async for output in outputs:
            yield output
    except VLLMClientError as exc:
        raise EngineError(f"vLLM refused the request: {exc}", getattr(exc, "parameter", None)) from exc
    except Exception as exc:
        raise_if_dead(exc)
        raise


def raise_if_dead(exc: Exception) -> None:
    """EngineDied for vLLM's dead-engine error (the engine core or a worker process died)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        raise EngineDied(f"vLLM's engine core died: {exc}") from exc
