"""Chat and text completions: job -> model -> resolved personas -> engine -> OpenAI objects or SSE.

A job becomes one generation per prompt (a chat has one; a text completion may list several), each
with the job's ``n`` answers; answer ``i`` of prompt ``p`` is the response's choice ``p * n + i``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field
from typing import Any

from persona_store.base import PersonaStore
from server.engine.base import Backend, GenerationRequest, SamplingParams, TokenChunk
from server.errors import EngineFault, InvalidRequest
from server.metrics import Metrics
from server.serving.completion_job import CompletionJob
from server.serving.errors import RequestRejected
from server.serving.model_registry import ModelRegistry
from server.serving.monitoring import Monitor, load_monitors, monitored_blocks, persona_scores
from server.serving.personas import ResolvedPersonas, resolve_personas
from server.serving.protocol import responses
from server.serving.steering_loops import LoopPlan, LoopReport, plan_loop


@dataclass(frozen=True)
class Limits:
    max_tokens_cap: int
    default_max_tokens: int
    max_strength: float


@dataclass(frozen=True)
class _Plan:
    """What every prompt of a job shares once resolved."""

    backend: Backend
    sampling: SamplingParams
    personas: ResolvedPersonas
    monitors: list[Monitor]
    loop: LoopPlan | None = None


@dataclass
class _Run:
    """One prompt's admitted generation (its n answers) whose first chunk has arrived."""

    job: CompletionJob
    plan: _Plan
    stream: AsyncIterator[TokenChunk]
    first: TokenChunk
    arrived: float
    release: ExitStack
    request: GenerationRequest
    offset: int  # the choice index of its first answer
    token_ids: list[int] = field(default_factory=list)  # of its answers, for a monitoring read-back
    report: LoopReport | None = None  # what its closed loop did, token by token

    async def close(self) -> None:
        await self.stream.aclose()  # type: ignore[attr-defined]
        self.release.close()


def _shape(job: CompletionJob) -> responses.ResponseShape:
    prefix = "chatcmpl-" if job.is_chat else "cmpl-"
    return responses.ResponseShape(
        chat=job.is_chat,
        response_id=prefix + uuid.uuid4().hex,
        created=int(time.time()),
        model=job.model,
        logprobs=responses.LogprobWriter(token_ids=job.tokens_as_ids),
    )


def _persona_echo(job: CompletionJob, personas: ResolvedPersonas, report: LoopReport | None = None) -> Any:
    """The personas applied; a target persona with its mean strength so far."""
    echoes = [echo.to_dict() for echo in personas.echoes]
    target = report.target_echo() if report is not None else None
    if target is not None:
        echoes.append(target)
    if not echoes:
        return None
    return echoes[0] if len(echoes) == 1 and not isinstance(job.persona, list) else echoes


def _name_the_prompt(exc: BaseException, job: CompletionJob) -> None:
    """An engine refuses a prompt (longer than the context, empty, not renderable) without knowing
    the request's fields: name the field, as the OpenAI API does (messages, or a text's prompt)."""
    if isinstance(exc, InvalidRequest) and exc.param is None:
        exc.param = "messages" if job.is_chat else "prompt"


class CompletionService:
    def __init__(
        self, registry: ModelRegistry, store: PersonaStore, metrics: Metrics, limits: Limits
    ) -> None:
        self._registry = registry
        self._store = store
        self._metrics = metrics
        self._limits = limits

    def _check(self, job: CompletionJob, backend: Backend) -> None:
        """Refuse what this server or this engine cannot serve, naming the field."""
        max_tokens = job.sampling.max_tokens
        if max_tokens is not None and max_tokens > self._limits.max_tokens_cap:
            raise RequestRejected(
                f"max_tokens is {max_tokens}; this server allows at most {self._limits.max_tokens_cap}",
                param="max_tokens",
            )
        answers = job.n * len(job.prompts)
        if answers > self._registry.max_in_flight:
            raise RequestRejected(
                f"{answers} answers were asked for (n times the prompts); this server runs at most "
                f"{self._registry.max_in_flight} at once per model",
                param="n",
            )
        if job.persona_monitor and answers > 1:
            raise RequestRejected(
                "persona_monitor scores one answer: it cannot be combined with n > 1 or several prompts",
                param="n" if job.n > 1 else "prompt",
            )
        operated = isinstance(job.persona, list) and any(term.operator != "add" for term in job.persona)
        if operated and job.closed_loop:
            raise RequestRejected(
                "ablate and cap do not combine with persona_target, persona_when or persona_monitor_tokens "
                "yet: the in-flight readings assume a persona is added",
                param="persona_operator"
                if isinstance(job.persona, list) and len(job.persona) == 1
                else "persona",
            )
        if job.echo and job.sampling.logprob_count() is not None:
            raise RequestRejected("echo cannot be combined with logprobs", param="echo")
        if job.sampling.structured_output() is not None and not backend.info.constrained_decoding:
            raise RequestRejected(
                f"response_format asks for JSON, which needs constrained decoding; the "
                f"{backend.info.backend} engine serving {job.model} has none (the vllm engine does)",
                param="response_format",
            )

    async def _plan(self, job: CompletionJob) -> _Plan:
        backend = self._registry.get(job.model)
        self._check(job, backend)
        sampling = job.sampling.to_sampling_params(self._limits.default_max_tokens)
        personas = await resolve_personas(
            self._store,
            backend.info,
            job.persona,
            job.persona_strength,
            job.steering,
            self._limits.max_strength,
        )
        monitors = await load_monitors(self._store, backend.info, job.persona_monitor)
        limit = self._limits.max_strength
        loop = await plan_loop(self._store, backend.info, job, personas, monitors, limit)
        return _Plan(backend, sampling, personas, monitors, loop)

    async def _open(self, job: CompletionJob, plan: _Plan, prompt: str | None, offset: int) -> _Run:
        arrived = time.perf_counter()
        loop = plan.loop
        request = GenerationRequest(
            sampling=plan.sampling,
            prompt=prompt,
            messages=job.messages,
            steering=plan.personas.plan if loop is None else loop.prompt_plan,
            monitor_blocks=monitored_blocks(plan.monitors) if plan.monitors else None,
            n=job.n,
            loop=None if loop is None else loop.spec,
        )
        release = ExitStack()
        release.enter_context(self._registry.admit(job.model, places=job.n))
        waiting = self._metrics.requests_waiting.labels(job.model)
        waiting.inc()
        stream = plan.backend.generate(request)
        try:
            first = await anext(stream)
        except BaseException as exc:
            await stream.aclose()  # type: ignore[attr-defined]
            release.close()
            _name_the_prompt(exc, job)
            raise
        finally:
            waiting.dec()
        return _Run(
            job=job,
            plan=plan,
            stream=stream,
            first=first,
            arrived=arrived,
            release=release,
            request=request,
            offset=offset,
            report=None if loop is None else LoopReport(loop),
        )

    async def _open_all(self, job: CompletionJob) -> list[_Run]:
        """Open every prompt's generation; if one fails, close the others and raise its error."""
        plan = await self._plan(job)
        prompts = job.prompts
        if len(prompts) == 1:
            return [await self._open(job, plan, prompts[0], 0)]
        tasks = [
            asyncio.ensure_future(self._open(job, plan, prompt, index * job.n))
            for index, prompt in enumerate(prompts)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    await task.result().close()
            raise

    async def _chunks(self, run: _Run) -> AsyncIterator[TokenChunk]:
        """The run's chunks, first included, recording metrics; frees the run's admission place at the end."""
        labels = (run.job.model, run.plan.personas.label)
        metrics = self._metrics
        now = time.perf_counter()
        metrics.time_to_first_token.labels(*labels).observe(now - run.arrived)
        if run.first.queue_seconds is not None:
            metrics.queue_time.labels(*labels).observe(run.first.queue_seconds)
        running = metrics.requests_running.labels(run.job.model)
        running.inc()
        status, last, previous = "cancelled", run.first, now
        generated: dict[int, int] = {}  # answer -> its tokens so far
        try:
            run.token_ids.extend(run.first.token_ids)
            generated[run.first.index] = run.first.completion_tokens
            yield run.first
            async for chunk in run.stream:
                run.token_ids.extend(chunk.token_ids)
                generated[chunk.index] = chunk.completion_tokens
                now = time.perf_counter()
                metrics.inter_token_latency.labels(*labels).observe(now - previous)
                previous, last = now, chunk
                yield chunk
            status = last.finish_reason.value if last.finish_reason else "unfinished"
        except Exception:
            status = "error"
            raise
        finally:
            await run.close()
            running.dec()
            metrics.request_latency.labels(*labels).observe(time.perf_counter() - run.arrived)
            metrics.prompt_tokens.labels(*labels).inc(last.prompt_tokens)
            metrics.generation_tokens.labels(*labels).inc(sum(generated.values()))
            metrics.requests.labels(*labels, status).inc()

    async def _merged(self, runs: list[_Run]) -> AsyncIterator[tuple[_Run, TokenChunk]]:
        """Every run's chunks as they arrive, each with its run."""
        if len(runs) == 1:
            async with aclosing(self._chunks(runs[0])) as chunks:
                async for chunk in chunks:
                    yield runs[0], chunk
            return
        arrivals: asyncio.Queue[tuple[_Run, TokenChunk | Exception | None]] = asyncio.Queue()

        async def pump(run: _Run) -> None:
            try:
                async with aclosing(self._chunks(run)) as chunks:
                    async for chunk in chunks:
                        arrivals.put_nowait((run, chunk))
            except Exception as exc:
                arrivals.put_nowait((run, exc))
            finally:
                arrivals.put_nowait((run, None))

        pumps = [asyncio.ensure_future(pump(run)) for run in runs]
        try:
            remaining = len(runs)
            while remaining:
                run, item = await arrivals.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield run, item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _scores(self, run: _Run, last: TokenChunk) -> dict[str, float] | None:
        """The monitored personas' scores of the finished answer (None when none was asked for): from
        the block outputs the engine read while generating, else from a read-back of the answer."""
        if not run.job.persona_monitor:
            return None
        means = last.response_means
        if means is None:
            unsteered = GenerationRequest(
                sampling=run.request.sampling, prompt=run.request.prompt, messages=run.request.messages
            )
            blocks = monitored_blocks(run.plan.monitors)  # the read-back stops after the last block needed
            means = await run.plan.backend.response_activations(unsteered, run.token_ids, blocks)
        scores = persona_scores(means, run.plan.monitors)
        for name, score in scores.items():
            self._metrics.persona_score.labels(run.job.model, name).observe(score)
        return scores

    @staticmethod
    def _loop_fields(run: _Run, chunk: TokenChunk) -> dict[str, Any] | None:
        """A streamed chunk's closed-loop fields: its tokens' readings and strengths, and on the last
        chunk the rules that fired."""
        if run.report is None:
            return None
        fields = run.report.add(chunk.traces or ())
        if chunk.finish_reason is not None:
            fields.update(run.report.fired())
        return fields or None

    @staticmethod
    def _echoes(job: CompletionJob) -> list[str]:
        """Each answer's prompt text, by answer index, when the job asked to echo it."""
        if not job.echo or job.is_chat:
            return []
        return [prompt or "" for prompt in job.prompts for _ in range(job.n)]

    async def complete(self, job: CompletionJob) -> dict[str, Any]:
        runs = await self._open_all(job)
        answers = {index: responses.Answer(index) for index in range(job.n * len(runs))}
        scores = None
        async with aclosing(self._merged(runs)) as chunks:
            async for run, chunk in chunks:
                answers[run.offset + chunk.index].add(chunk)
                if run.report is not None and chunk.traces:
                    run.report.add(chunk.traces)
                if chunk.finish_reason is not None and run.job.persona_monitor:
                    scores = await self._scores(run, chunk)
        totals = responses.usage(
            sum(run.first.prompt_tokens for run in runs), sum(a.completion_tokens for a in answers.values())
        )
        report = runs[0].report
        persona = _persona_echo(job, runs[0].plan.personas, report)
        extras = report.final() if report is not None else None
        # Built in a worker thread: n answers with logprobs make hundreds of thousands of dicts, and
        # Python code there yields the GIL to the event loop every few milliseconds.
        return await asyncio.to_thread(
            _shape(job).completion, list(answers.values()), totals, persona, scores, self._echoes(job), extras
        )

    async def stream(self, job: CompletionJob) -> AsyncIterator[str]:
        """Open the generation (errors raise here, before any byte is sent), then return its SSE events."""
        runs = await self._open_all(job)
        return self._events(job, runs)

    async def _events(self, job: CompletionJob, runs: list[_Run]) -> AsyncIterator[str]:
        shape, persona = _shape(job), _persona_echo(job, runs[0].plan.personas, runs[0].report)
        echoes = self._echoes(job)
        sent: dict[int, int] = {}  # answer -> characters of its text sent so far
        generated: dict[int, int] = {}
        try:
            async with aclosing(self._merged(runs)) as chunks:
                async for run, chunk in chunks:
                    index = run.offset + chunk.index
                    first = index not in sent
                    text = (echoes[index] if echoes and first else "") + chunk.text
                    offset = sent.get(index, 0)
                    sent[index] = offset + len(text)
                    generated[index] = chunk.completion_tokens
                    finish = chunk.finish_reason.value if chunk.finish_reason else None
                    scores = await self._scores(run, chunk) if finish else None  # on the final chunk
                    extras = self._loop_fields(run, chunk)
                    if finish and run.report is not None:
                        persona = _persona_echo(job, run.plan.personas, run.report)  # the mean strength
                    if text or first or finish or chunk.logprobs or extras:
                        payload = shape.chunk(
                            text,
                            finish,
                            persona,
                            first=first,
                            scores=scores,
                            index=index,
                            logprobs=chunk.logprobs,
                            offset=offset,
                            extras=extras,
                        )
                        yield responses.sse(payload)
        except EngineFault as exc:
            # The answer cannot end normally: an error event (as vLLM sends one), which the openai
            # client raises as an APIError, instead of a stream that breaks off or never ends.
            yield responses.sse(responses.stream_error(str(exc), "engine_error"))
            yield responses.sse("[DONE]")
            return
        if job.include_usage:
            totals = responses.usage(sum(run.first.prompt_tokens for run in runs), sum(generated.values()))
            yield responses.sse(shape.usage_chunk(totals))
        yield responses.sse("[DONE]")
