"""The vLLM backend: vLLM's own ``AsyncLLM`` in our process, steered by hooks in its workers.

Prompts are rendered and detokenized by our code (prompts.py, text_stream.py), as on the HF engine,
so one request gives the same tokens and text on both; vLLM schedules, batches, caches and samples.
A steered request carries only references to vector sets the workers hold (resident.py), and a
cache salt from its plan, so KV computed under one plan is never reused under another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic

from server.engine.base import (
    EngineError,
    GenerationRequest,
    ModelInfo,
    StructuredOutput,
    TokenChunk,
    TokenLogprob,
)
from server.engine.prompt_bound import hf_max_token_chars
from server.engine.prompts import answer_ids, eos_token_ids, prompt_ids
from server.engine.read_back import answer_tokens, leading_blocks
from server.engine.sequence import Sequence, emit, finish_last, holds_last
from server.engine.vllm.faults import as_engine_errors, raise_if_dead
from server.engine.vllm.in_flight import InFlightMonitor, in_flight_monitor
from server.engine.vllm.loops import LoopRun, open_loop
from server.engine.vllm.model_types import check_model_type
from server.engine.vllm.options import VLLMOptions
from server.engine.vllm.plan_refs import cache_salt, edit_term, slots_wanted, steering_args
from server.engine.vllm.read_backs import ReadBacks
from server.engine.vllm.resident import ResidentSets
from server.engine.vllm.slot_gate import SlotGate
from server.engine.vllm.trace_taker import TraceTaker
from server.steering.closed_loop import TokenTrace


def _pipeline_stages(engine: Any) -> int:
    config = getattr(engine, "vllm_config", None)
    return int(getattr(getattr(config, "parallel_config", None), "pipeline_parallel_size", 1) or 1)


def token_logprob(sequence: Sequence, completion: Any, index: int) -> TokenLogprob | None:
    """The logprobs vLLM computed for the ``index``-th new token, named by our tokenizer."""
    if sequence.sampling.logprobs is None or not completion.logprobs:
        return None
    entries = completion.logprobs[index]  # token id -> Logprob(logprob, rank, decoded_token)
    token = completion.token_ids[index]
    name = sequence.text.token_text
    ranked = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in entries.items())
    top = tuple((token_id, name(token_id), float(logprob)) for _, token_id, logprob in ranked)
    return TokenLogprob(token, name(token), float(entries[token].logprob), top[: sequence.sampling.logprobs])


def structured_outputs(structured: StructuredOutput | None) -> Any:
    """vLLM's constraint for a JSON answer (any object, or one schema)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if structured.schema is None:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=structured.schema)


def queue_seconds(output: Any) -> float | None:
    """Time from the engine core's queue to the request's first schedule, from vLLM's own stats."""
    stats = getattr(output, "metrics", None)
    if stats is None or not getattr(stats, "scheduled_ts", 0.0):
        return None
    return max(float(stats.scheduled_ts - stats.queued_ts), 0.0)


class VLLMBackend:
    """Serves one model on a vLLM engine; every request may carry its own steering plan."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        model_id: str,
        eos_ids: set[int],
        slots: int,
        resident_capacity: int = 64,
    ) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        text_config = engine.model_config.hf_text_config
        num_layers = int(text_config.num_hidden_layers)
        self._info = ModelInfo(
            id=model_id,
            backend="vllm",
            num_layers=num_layers,
            hidden_size=int(text_config.hidden_size),
            max_context=int(engine.model_config.max_model_len),
            steerable_layers=tuple(range(num_layers)),
            constrained_decoding=True,  # vLLM's structured outputs
            max_token_chars=hf_max_token_chars(tokenizer),
            # A loop's readings steer earlier blocks in the next pass: one worker must hold every block.
            closed_loop=_pipeline_stages(engine) == 1,
            operators=("add", "ablate", "cap"),
            edits_per_block=1,  # one edit slot per token in the compiled graph (in_graph.py)
        )
        self._eos_ids = eos_ids
        self._resident = ResidentSets(self._rpc, resident_capacity)
        self._read_backs = ReadBacks(engine, self._rpc, self._info, self._ensure_set_up)
        self._traces = TraceTaker(self._rpc)
        self._gate = SlotGate(slots)  # no forward carries more plans than the workers have slots
        self._setup_lock = asyncio.Lock()
        self._set_up = False

    @classmethod
    def load(cls, source: str | Path, *, model_id: str | None = None, options: VLLMOptions) -> VLLMBackend:
        from transformers import AutoTokenizer, GenerationConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        name = model_id or Path(str(source).rstrip("/")).name
        try:
            engine_args = AsyncEngineArgs(**options.engine_kwargs(str(source), name))
        except TypeError as exc:  # a name in --vllm-engine-args that vLLM does not have
            raise EngineError(f"--vllm-engine-args: {exc}") from exc
        check_model_type(source)  # before vLLM starts: a type it would steer wrongly is refused here
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        try:
            generation_config = GenerationConfig.from_pretrained(str(source))
        except OSError:  # a model without generation_config.json
            generation_config = None
        options.prepare_process()
        try:
            engine = AsyncLLM.from_engine_args(engine_args)
        except pydantic.ValidationError as exc:  # vLLM checks its whole configuration before it starts
            reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
            raise EngineError(f"vLLM refused the settings for {name}: {reasons}") from exc
        return cls(engine, tokenizer, name, eos_token_ids(generation_config, tokenizer), options.slots)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def _rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """``method`` on every worker of every engine; one result per worker.

        With data parallelism vLLM sends a collective RPC to every engine but returns the first
        engine's results only; a read-back ran on one of them, so every engine's are gathered."""
        await self._ensure_set_up()
        core = self._engine.engine_core
        try:
            if hasattr(core, "call_utility_all_async") and len(getattr(core, "core_engines", ())) > 1:
                per_engine = await core.call_utility_all_async("collective_rpc", method, None, args, None)
                return [result for results in per_engine for result in results]
            return await self._engine.collective_rpc(method, args=args)
        except Exception as exc:
            raise_if_dead(exc)
            raise

    def failure(self) -> str | None:
        """Why the engine can no longer serve (vLLM's engine core or a worker died), or None."""
        return "vLLM's engine core died" if self._engine.errored else None

    async def _ensure_set_up(self) -> None:
        """Install the hooks in every worker, once, before the first request that needs them."""
        if self._set_up:
            return
        async with self._setup_lock:
            if not self._set_up:
                try:
                    await self._engine.collective_rpc("persona_setup")  # reaches every engine
                except Exception as exc:
                    raise_if_dead(exc)
                    raise
                self._set_up = True

    async def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker: rows steered so far, vector sets held, blocks owned (tests and diagnostics)."""
        return await self._rpc("persona_stats")

    def answer_ids(self, text: str) -> list[int]:
        return answer_ids(self._tokenizer, text)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prompt_ids(self._tokenizer, request, self._info)

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        chunks: list[TokenChunk] = []
        ids = await asyncio.to_thread(self.prompt_ids, request)  # templating and tokenizing take time
        sequences = [
            Sequence.for_request(request, ids, self._info, self._tokenizer, chunks.append, index)  # type: ignore[arg-type]
            for index in range(request.n)
        ]
        first = sequences[0]
        await self._ensure_set_up()
        held = [] if first.plan is None else [*first.plan.terms, *filter(None, [edit_term(first.plan)])]
        keys = await self._resident.acquire(held)
        # vLLM refuses n > 1 when greedy: the answers are equal, so one is generated and shared.
        shared = first.sampling.greedy and request.n > 1
        loop: LoopRun | None = None
        monitor: InFlightMonitor | None = None
        admitted = contextlib.AsyncExitStack()
        try:
            await admitted.enter_async_context(self._gate.admit(slots_wanted(first)))
            loop, monitor, prompt, params = await self._submission(request, first, 1 if shared else request.n)
            outputs = self._engine.generate(
                prompt, params, request_id=f"{request.request_id}-{uuid.uuid4().hex}"
            )
            async with contextlib.aclosing(outputs):
                async for output in as_engine_errors(outputs):
                    # An answer held before this output: the step that fed its last token has run.
                    fed_last = holds_last(first)
                    for completion in output.outputs:
                        traces = await loop.traces(len(completion.token_ids)) if loop is not None else None
                        for sequence in sequences if shared else [sequences[completion.index]]:
                            self._emit_all(sequence, completion, chunks, queue_seconds(output), traces)
                    for chunk in chunks:
                        yield chunk
                    chunks.clear()
                    if fed_last or all(sequence.finished for sequence in sequences):
                        break
            if monitor is not None and first.capture is not None and first.capture.held is not None:
                means = await monitor.means(self._read_backs.steered_last, self._info.max_context)
                first.finished = True
                yield dataclasses.replace(first.capture.held, response_means=means)
        finally:
            if monitor is not None:
                await monitor.drop()
            if loop is not None:
                await loop.close()
            await admitted.aclose()
            self._resident.release(keys)
            if keys:
                await self._resident.evict()

    async def _submission(
        self, request: GenerationRequest, first: Sequence, n: int
    ) -> tuple[LoopRun | None, InFlightMonitor | None, dict[str, Any], Any]:
        """The request as vLLM takes it (prompt, sampling parameters), with its closed loop and its
        in-flight monitor when it has them."""
        plan_salt = cache_salt(first.plan, len(first.prompt_ids)) if first.plan is not None else None
        plan_args = steering_args(first.plan)
        steering, salt = plan_args, plan_salt
        loop = monitor = None
        if first.loop is not None:
            loop = await open_loop(first, self._read_backs.steered_last, self._traces, plan_args, plan_salt)
            steering, salt = {**steering, **loop.extra_args()}, loop.cache_salt
        if self._info.closed_loop:  # one pipeline stage: one worker holds every monitored block
            owns_salt = loop is not None and loop.owns_salt
            monitor = in_flight_monitor(first, request, self._info, self._rpc, (plan_args, salt), owns_salt)
        one_more = 0
        if monitor is not None:
            steering = {**steering, **monitor.extra_args()}
            # One token more than the answer may have, so that vLLM feeds its last token back.
            one_more = int(len(first.prompt_ids) + first.max_new_tokens < self._info.max_context)
        params = self._sampling_params(first, n, steering, one_more)  # answer i samples with seed + i
        prompt: dict[str, Any] = {"prompt_token_ids": first.prompt_ids}
        if salt is not None:
            prompt["cache_salt"] = salt
        return loop, monitor, prompt, params

    def _emit_all(
        self,
        sequence: Sequence,
        completion: Any,
        chunks: list[TokenChunk],
        queued: float | None,
        traces: list[TokenTrace] | None = None,
    ) -> None:
        """One answer's new tokens from vLLM as our chunks (text, stops and usage as on every engine)."""
        if sequence.finished or holds_last(sequence):
            return  # a stop string of ours ended it; vLLM may still be generating it
        if sequence.queue_seconds is None:
            sequence.queue_seconds = queued
        for index, token in enumerate(completion.token_ids):
            trace = traces[index] if traces is not None else None
            emit(sequence, token, self._eos_ids, token_logprob(sequence, completion, index), trace)
            if sequence.finished or holds_last(sequence):
                return  # what vLLM ran past the answer's end in the same output is not the answer's
        if completion.finish_reason is not None:  # vLLM stopped on an id we do not know
            finish_last(sequence, chunks)

    def _sampling_params(
        self, sequence: Sequence, n: int, extra_args: dict[str, Any], one_more: int = 0
    ) -> Any:
        """vLLM's sampling parameters for the sequence's request (``one_more`` token past its budget
        where the last token must be fed back)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = sequence.sampling
        return SamplingParams(
            n=n,
            max_tokens=sequence.max_new_tokens + one_more,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            min_tokens=sampling.min_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            logprobs=sampling.logprobs,
            structured_outputs=structured_outputs(sampling.structured),
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            detokenize=False,  # our TextStream detokenizes and applies stop strings, as on every engine
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args or None,
        )

    async def response_activations(
        self, request: GenerationRequest, response_ids: list[int], num_blocks: int | None = None
    ) -> np.ndarray:
        """Mean outputs of the first ``num_blocks`` blocks (default: all) over the response tokens,
        unsteered: [num_blocks, hidden]."""
        tokens, start = answer_tokens(self.prompt_ids(request), response_ids)
        blocks = leading_blocks(num_blocks, self._info.num_layers)
        self._check_fits(tokens)
        means, _ = await self._read_backs.block_outputs(tokens, start, blocks)
        return means

    async def text_activations(
        self, texts: list[str], progress: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """Block outputs for raw texts, unsteered: [len(texts), 2 (last token, mean), num_layers, hidden]."""
        encoded = [list(self._tokenizer(text)["input_ids"])[: self._info.max_context - 1] for text in texts]
        if any(not ids for ids in encoded):
            raise EngineError("a text encodes to no tokens")
        done = 0

        async def one(ids: list[int]) -> np.ndarray:
            nonlocal done
            means, last = await self._read_backs.block_outputs(ids, 0, self._info.num_layers)
            done += 1
            if progress is not None:
                progress(done / len(encoded))
            return np.stack([last, means])

        return np.stack(await asyncio.gather(*(one(ids) for ids in encoded)))

    async def response_nll(self, request: GenerationRequest, response_ids: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) and count of the response tokens, unsteered."""
        tokens, start = answer_tokens(self.prompt_ids(request), response_ids)
        self._check_fits(tokens)
        return await self._read_backs.nll(tokens, start)

    def _check_fits(self, tokens: list[int]) -> None:
        # A read-back runs the answer as a prompt and samples one token after it.
        if len(tokens) + 1 > self._info.max_context:
            raise EngineError(
                f"{len(tokens)} tokens do not fit a read-back in a context of {self._info.max_context}"
            )

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.shutdown)
