"""Chat and text completions: job -> model -> resolved personas -> engine -> OpenAI objects or SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field
from typing import Any

from persona_store.base import PersonaStore
from server.engine.base import GenerationRequest, SamplingParams, TokenChunk
from server.metrics import Metrics
from server.serving import responses
from server.serving.errors import RequestRejected
from server.serving.model_registry import ModelRegistry
from server.serving.monitoring import Monitor, load_monitors, monitored_blocks, persona_scores
from server.serving.personas import ResolvedPersonas, resolve_personas
from server.serving.requests import CompletionJob


@dataclass(frozen=True)
class Limits:
    max_tokens_cap: int
    default_max_tokens: int
    max_strength: float


@dataclass
class _Run:
    """One admitted generation whose first chunk has arrived."""

    job: CompletionJob
    personas: ResolvedPersonas
    stream: AsyncIterator[TokenChunk]
    first: TokenChunk
    arrived: float
    release: ExitStack
    request: GenerationRequest
    monitors: list[Monitor]
    token_ids: list[int] = field(default_factory=list)
    shape: responses.ResponseShape = field(init=False)

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.job.is_chat else "cmpl-"
        self.shape = responses.ResponseShape(
            chat=self.job.is_chat,
            response_id=prefix + uuid.uuid4().hex,
            created=int(time.time()),
            model=self.job.model,
        )

    @property
    def persona_echo(self) -> Any:
        echoes = [echo.to_dict() for echo in self.personas.echoes]
        if not echoes:
            return None
        return echoes[0] if isinstance(self.job.persona, str) else echoes


class CompletionService:
    def __init__(
        self, registry: ModelRegistry, store: PersonaStore, metrics: Metrics, limits: Limits
    ) -> None:
        self._registry = registry
        self._store = store
        self._metrics = metrics
        self._limits = limits

    def _sampling(self, job: CompletionJob) -> SamplingParams:
        if job.max_tokens is not None and job.max_tokens > self._limits.max_tokens_cap:
            raise RequestRejected(
                f"max_tokens is {job.max_tokens}; this server allows at most {self._limits.max_tokens_cap}",
                param="max_tokens",
            )
        return SamplingParams(
            max_tokens=job.max_tokens if job.max_tokens is not None else self._limits.default_max_tokens,
            temperature=1.0 if job.temperature is None else job.temperature,
            top_p=1.0 if job.top_p is None else job.top_p,
            stop=job.stop,
            seed=job.seed,
            ignore_eos=job.ignore_eos,
            clamp_to_context=job.max_tokens is None,
        )

    async def _open(self, job: CompletionJob) -> _Run:
        arrived = time.perf_counter()
        backend = self._registry.get(job.model)
        sampling = self._sampling(job)
        personas = await resolve_personas(
            self._store,
            backend.info,
            job.persona,
            job.persona_strength,
            job.steering,
            self._limits.max_strength,
        )
        monitors = await load_monitors(self._store, backend.info, job.persona_monitor)
        request = GenerationRequest(
            sampling=sampling, prompt=job.prompt, messages=job.messages, steering=personas.plan,
            monitor_blocks=monitored_blocks(monitors) if monitors else None,
        )  # fmt: skip
        release = ExitStack()
        release.enter_context(self._registry.admit(job.model))
        waiting = self._metrics.requests_waiting.labels(job.model)
        waiting.inc()
        stream = backend.generate(request)
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()  # type: ignore[attr-defined]
            release.close()
            raise
        finally:
            waiting.dec()
        return _Run(job=job, personas=personas, stream=stream, first=first, arrived=arrived, release=release,
                    request=request, monitors=monitors)  # fmt: skip

    async def _chunks(self, run: _Run) -> AsyncIterator[TokenChunk]:
        """The run's chunks, first included, recording metrics; frees the run's admission place at the end."""
        labels = (run.job.model, run.personas.label)
        metrics = self._metrics
        now = time.perf_counter()
        metrics.time_to_first_token.labels(*labels).observe(now - run.arrived)
        if run.first.queue_seconds is not None:
            metrics.queue_time.labels(*labels).observe(run.first.queue_seconds)
        running = metrics.requests_running.labels(run.job.model)
        running.inc()
        status, last, previous = "cancelled", run.first, now
        try:
            run.token_ids.extend(run.first.token_ids)
            yield run.first
            async for chunk in run.stream:
                run.token_ids.extend(chunk.token_ids)
                now = time.perf_counter()
                metrics.inter_token_latency.labels(*labels).observe(now - previous)
                previous, last = now, chunk
                yield chunk
            status = last.finish_reason.value if last.finish_reason else "unfinished"
        except Exception:
            status = "error"
            raise
        finally:
            await run.stream.aclose()  # type: ignore[attr-defined]
            run.release.close()
            running.dec()
            metrics.request_latency.labels(*labels).observe(time.perf_counter() - run.arrived)
            metrics.prompt_tokens.labels(*labels).inc(last.prompt_tokens)
            metrics.generation_tokens.labels(*labels).inc(last.completion_tokens)
            metrics.requests.labels(*labels, status).inc()

    async def _scores(self, run: _Run, last: TokenChunk) -> dict[str, float] | None:
        """The monitored personas' scores of the finished answer (None when none was asked for): from
        the block outputs the engine read while generating, else from a read-back of the answer."""
        if not run.job.persona_monitor:
            return None
        means = last.response_means
        if means is None:
            unsteered = GenerationRequest(sampling=run.request.sampling, prompt=run.request.prompt,
                                          messages=run.request.messages)  # fmt: skip
            backend = self._registry.get(run.job.model)
            blocks = monitored_blocks(run.monitors)  # the read-back stops after the last block needed
            means = await backend.response_activations(unsteered, run.token_ids, blocks)
        scores = persona_scores(means, run.monitors)
        for name, score in scores.items():
            self._metrics.persona_score.labels(run.job.model, name).observe(score)
        return scores

    async def complete(self, job: CompletionJob) -> dict[str, Any]:
        run = await self._open(job)
        text, last = [], run.first
        async with aclosing(self._chunks(run)) as chunks:
            async for chunk in chunks:
                text.append(chunk.text)
                last = chunk
        return run.shape.completion("".join(text), last, run.persona_echo, await self._scores(run, last))

    async def stream(self, job: CompletionJob) -> AsyncIterator[str]:
        """Open the generation (errors raise here, before any byte is sent), then return its SSE events."""
        run = await self._open(job)
        return self._events(run)

    async def _events(self, run: _Run) -> AsyncIterator[str]:
        last, first = run.first, True
        async with aclosing(self._chunks(run)) as chunks:
            async for chunk in chunks:
                last = chunk
                finish = chunk.finish_reason.value if chunk.finish_reason else None
                scores = await self._scores(run, chunk) if finish else None  # on the final chunk
                if chunk.text or first or finish:
                    payload = run.shape.chunk(
                        chunk.text, finish, run.persona_echo, first=first, scores=scores
                    )
                    yield responses.sse(payload)
                first = False
        if run.job.include_usage:
            yield responses.sse(run.shape.usage_chunk(last))
        yield responses.sse("[DONE]")
