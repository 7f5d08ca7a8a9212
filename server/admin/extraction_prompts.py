"""An extraction's prompts checked against the model's context when the extraction is requested.

Every answer of an extraction is generated from a question under one of its side's system prompts;
a prompt that leaves no room for one answer token is refused by the engine (its context check),
which in a job meant a failed job after the rest of its work. The very prompts the job would send
are tokenized here as the engine tokenizes them (its ``prompt_ids``), off the event loop, and the
first that does not fit makes the request a 400 naming ``questions``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.admin.extraction import ExtractionSpec, conversation, pairings
from server.admin.extraction_jobs import MAX_EXTRACTION_ANSWERS
from server.engine.base import GenerationRequest, SamplingParams
from server.errors import InvalidRequest
from server.serving.errors import RequestRejected
from server.serving.model_registry import ModelRegistry

_SIDES = ("positive", "negative")
_ONE_TOKEN = SamplingParams(max_tokens=1)


def _misfit(backend: Any, spec: ExtractionSpec) -> str | None:
    """Why the first prompt that cannot be answered cannot be, or None when every one can."""
    max_context = backend.info.max_context
    seen: set[tuple[str, str]] = set()
    for side, prompts in zip(_SIDES, (spec.positive_prompts, spec.negative_prompts), strict=True):
        for q_index, _sample, p_index in pairings(prompts, spec):
            system, question = prompts[p_index], spec.questions[q_index]
            if (system, question) in seen:
                continue
            seen.add((system, question))
            where = f"question {q_index} under {side}_prompts[{p_index}]"
            request = GenerationRequest(sampling=_ONE_TOKEN, messages=conversation(system, question))
            try:
                tokens = len(backend.prompt_ids(request))
            except InvalidRequest as exc:  # longer than the context by its characters alone, or unrenderable
                return f"{where} cannot be answered: {exc}"
            if tokens >= max_context:
                return (
                    f"{where} is {tokens} tokens, which leaves no room for an answer in this model's "
                    f"context of {max_context} tokens"
                )
    return None


async def check_extraction_fits(registry: ModelRegistry, model: str, spec: ExtractionSpec) -> None:
    """RequestRejected (param questions) when a prompt of the extraction cannot be answered on
    ``model``. Skipped for an engine that cannot tokenize a prompt alone, and for an extraction over
    the answer limit (refused for that, without the cost of tokenizing it)."""
    backend = registry.get(model)
    answers = len(spec.questions) * spec.samples_per_question * 2
    if not callable(getattr(backend, "prompt_ids", None)) or answers > MAX_EXTRACTION_ANSWERS:
        return
    problem = await asyncio.to_thread(_misfit, backend, spec)
    if problem is not None:
        raise RequestRejected(problem, param="questions")
