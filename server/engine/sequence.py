"""One request inside an engine's scheduler thread, and the bridge that streams its chunks to asyncio.

Both backends run the model on a thread of their own; a request becomes a ``Sequence`` there, its
tokens become ``TokenChunk``s through ``emit``, and ``stream`` hands them to the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import torch

from server.engine.base import (
    EngineError,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
)
from server.engine.text_stream import TextStream
from server.steering.closed_loop import SteeringLoop, TokenTrace
from server.steering.plan import SteeringPlan, steers_generated_tokens

Sink = Callable[[TokenChunk | BaseException], None]


@dataclass(eq=False)
class ResponseCapture:
    """The response tokens' outputs of the first blocks, summed while they are fed back to the model.

    A response token's block outputs are computed when it is fed as the next step's input, so the
    last token needs one more step: its final chunk waits in ``held`` until that step has run.
    """

    num_blocks: int
    sums: torch.Tensor | None = None  # [num_blocks, hidden], float64
    count: int = 0
    held: TokenChunk | None = None

    def add(self, outputs: torch.Tensor) -> None:
        """One response token's outputs [num_blocks, hidden]."""
        outputs = outputs.double()
        self.sums = outputs if self.sums is None else self.sums + outputs
        self.count += 1

    def release(self) -> TokenChunk:
        """The held final chunk, carrying the means."""
        assert self.held is not None and self.sums is not None
        means = (self.sums / self.count).float().numpy()
        return dataclasses.replace(self.held, response_means=means)


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams
    plan: SteeringPlan | None
    text: TextStream
    sink: Sink
    max_new_tokens: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    # Set from the event loop's thread when the client goes away; read by the scheduler thread.
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    queue_seconds: float | None = None  # set when the scheduler takes it into a batch
    capture: ResponseCapture | None = None  # monitoring in flight (HF backend)
    index: int = 0  # which of its request's n answers this is
    loop: SteeringLoop | None = None  # closed-loop steering: readings and strengths per token

    @classmethod
    def for_request(
        cls,
        request: GenerationRequest,
        prompt_ids: list[int],
        info: ModelInfo,
        tokenizer: Any,
        sink: Sink,
        index: int = 0,
    ) -> Self:
        """Answer ``index`` of a request on a model: its token budget, its plan checked against the
        model (None when it steers nothing), a text stream over ``tokenizer``; EngineError or
        SteeringError when the model cannot serve it."""
        sampling = request.choice_sampling(index)
        max_new_tokens = new_token_budget(prompt_ids, sampling, info.max_context)
        plan = request.steering
        if plan is not None:
            plan.validate_for(info.num_layers, info.hidden_size)
        check_token_ids(sampling.stop_token_ids, len(tokenizer))
        return cls(
            prompt_ids=prompt_ids,
            sampling=sampling,
            plan=None if plan is None or plan.is_noop else plan,
            text=TextStream(tokenizer, sampling.stop, sampling.min_tokens),
            sink=sink,
            max_new_tokens=max_new_tokens,
            generator=sampling_generator(sampling),
            index=index,
            loop=SteeringLoop(request.loop) if request.loop is not None else None,
        )

    def generated_deltas(self) -> dict[int, torch.Tensor] | None:
        """What the sequence adds to each block at its next generated token: its closed loop's
        additions, else its plan's where the plan steers generated tokens (None: nothing)."""
        if self.loop is not None:
            return self.loop.deltas()
        plan = self.plan
        return plan.deltas if plan is not None and steers_generated_tokens(plan.positions) else None

    def mark_scheduled(self) -> None:
        """The scheduler starts this request's prefill: its time in the queue ends here."""
        self.queue_seconds = time.perf_counter() - self.submitted_at


def holds_last(sequence: Sequence) -> bool:
    """Whether the sequence has generated its last token and waits for a step to read it (in-flight
    monitoring: a token's block outputs are computed when it is fed back)."""
    return sequence.capture is not None and sequence.capture.held is not None


def blocks_read(sequence: Sequence) -> int:
    """How many leading blocks a decode step reads for the sequence (monitoring, its closed loop)."""
    capture = sequence.capture.num_blocks if sequence.capture is not None else 0
    return max(capture, sequence.loop.spec.num_blocks if sequence.loop is not None else 0)


def check_token_ids(token_ids: tuple[int, ...], vocab_size: int) -> None:
    """EngineError unless every id is in the tokenizer's vocabulary."""
    outside = [token for token in token_ids if token >= vocab_size]
    if outside:
        raise EngineError(
            f"stop_token_ids {outside} are not in this model's vocabulary of {vocab_size} tokens",
            "stop_token_ids",
        )


def new_token_budget(prompt_ids: list[int], sampling: SamplingParams, max_context: int) -> int:
    """How many tokens the request may generate; EngineError when the prompt leaves no room."""
    if not prompt_ids:
        raise EngineError("the prompt is empty")
    room = max_context - len(prompt_ids)
    max_new_tokens = min(sampling.max_tokens, room) if sampling.clamp_to_context else sampling.max_tokens
    if max_new_tokens < 1 or len(prompt_ids) + max_new_tokens > max_context:
        raise EngineError(
            f"this model's maximum context length is {max_context} tokens, but "
            f"{len(prompt_ids) + sampling.max_tokens} were requested ({len(prompt_ids)} in the prompt, "
            f"{sampling.max_tokens} for the completion)"
        )
    return max_new_tokens


def sampling_generator(sampling: SamplingParams) -> torch.Generator | None:
    """A seeded generator for sampled requests (the request's seed, else a random one); None for greedy."""
    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
    return torch.Generator().manual_seed(seed)


def ends_answer(sequence: Sequence, token: int, eos_token_ids: set[int]) -> bool:
    """Whether ``token`` ends the answer: an end-of-sequence id (unless ignored) or a stop id."""
    if token in sequence.sampling.stop_token_ids:
        return True
    return token in eos_token_ids and not sequence.sampling.ignore_eos


def emit(
    sequence: Sequence,
    token: int,
    eos_token_ids: set[int],
    logprob: TokenLogprob | None = None,
    trace: TokenTrace | None = None,
) -> None:
    """Append a generated token and send its chunk; marks the sequence finished on its last token."""
    sequence.output_ids.append(token)
    finish: FinishReason | None = None
    if ends_answer(sequence, token, eos_token_ids):
        finish, text = FinishReason.STOP, sequence.text.finish()
    else:
        text = sequence.text.push(token)
        if sequence.text.stopped:
            finish = FinishReason.STOP
        elif len(sequence.output_ids) >= sequence.max_new_tokens:
            finish = FinishReason.LENGTH
            text += sequence.text.finish()
    chunk = TokenChunk(
        text=text,
        token_ids=(token,),
        prompt_tokens=len(sequence.prompt_ids),
        completion_tokens=len(sequence.output_ids),
        finish_reason=finish,
        queue_seconds=sequence.queue_seconds if len(sequence.output_ids) == 1 else None,
        index=sequence.index,
        logprobs=None if logprob is None else (logprob,),
        traces=None if trace is None else (trace,),
    )
    if finish is not None and sequence.capture is not None:
        sequence.capture.held = chunk  # sent after one more step has read the last token's outputs
        return
    sequence.finished = finish is not None
    sequence.sink(chunk)


def finish_last(sequence: Sequence, chunks: list[TokenChunk]) -> None:
    """End a sequence its engine stopped on an end id of its own: the last chunk says so."""
    rest = sequence.text.finish()
    if chunks:
        chunks[-1] = dataclasses.replace(
            chunks[-1], text=chunks[-1].text + rest, finish_reason=FinishReason.STOP
        )
    else:
        chunks.append(
            TokenChunk(
                text=rest,
                token_ids=(),
                prompt_tokens=len(sequence.prompt_ids),
                completion_tokens=len(sequence.output_ids),
                finish_reason=FinishReason.STOP,
                index=sequence.index,
            )
        )
    sequence.finished = True


def fail(sequences: Iterable[Sequence], error: BaseException) -> None:
    for sequence in sequences:
        sequence.finished = True
        sequence.sink(error)


async def stream(
    make_sequences: Callable[[Sink], list[Sequence]], submit: Callable[[list[Sequence]], None]
) -> AsyncIterator[TokenChunk]:
    """Build a request's sequences (one per answer) with a sink into this event loop, submit them
    together, and yield their chunks until every answer has finished.

    Closing the iterator early (the client went away) cancels the sequences.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
    sequences: list[Sequence] = []

    def sink(item: TokenChunk | BaseException) -> None:
        # Called on the scheduler thread; the loop may already be gone if the client left.
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, item)
        except RuntimeError:
            for sequence in sequences:
                sequence.cancelled = True

    # Templating and tokenizing a long prompt take time: off the event loop, other clients go on.
    sequences.extend(await asyncio.to_thread(make_sequences, sink))
    submit(sequences)
    unfinished = len(sequences)
    try:
        while unfinished:
            item = await chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            unfinished -= item.finish_reason is not None
    finally:
        for sequence in sequences:
            sequence.cancelled = True
