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
)
from server.engine.text_stream import TextStream
from server.steering.plan import SteeringPlan

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

    @classmethod
    def for_request(
        cls, request: GenerationRequest, prompt_ids: list[int], info: ModelInfo, tokenizer: Any, sink: Sink
    ) -> Self:
        """A request's sequence on a model: its token budget, its plan checked against the model (None
        when it steers nothing), a text stream over ``tokenizer``; EngineError or SteeringError when
        the model cannot serve it."""
        sampling = request.sampling
        max_new_tokens = new_token_budget(prompt_ids, sampling, info.max_context)
        plan = request.steering
        if plan is not None:
            plan.validate_for(info.num_layers, info.hidden_size)
        return cls(
            prompt_ids=prompt_ids,
            sampling=sampling,
            plan=None if plan is None or plan.is_noop else plan,
            text=TextStream(tokenizer, sampling.stop),
            sink=sink,
            max_new_tokens=max_new_tokens,
            generator=sampling_generator(sampling),
        )

    def mark_scheduled(self) -> None:
        """The scheduler starts this request's prefill: its time in the queue ends here."""
        self.queue_seconds = time.perf_counter() - self.submitted_at


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


def emit(sequence: Sequence, token: int, eos_token_ids: set[int]) -> None:
    """Append a generated token and send its chunk; marks the sequence finished on its last token."""
    sequence.output_ids.append(token)
    finish: FinishReason | None = None
    if token in eos_token_ids and not sequence.sampling.ignore_eos:
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
            )
        )
    sequence.finished = True


def fail(sequences: Iterable[Sequence], error: BaseException) -> None:
    for sequence in sequences:
        sequence.finished = True
        sequence.sink(error)


async def stream(
    make_sequence: Callable[[Sink], Sequence], submit: Callable[[Sequence], None]
) -> AsyncIterator[TokenChunk]:
    """Build the sequence with a sink into this event loop, submit it, and yield its chunks.

    Closing the iterator early (the client went away) cancels the sequence.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
    holder: list[Sequence] = []

    def sink(item: TokenChunk | BaseException) -> None:
        # Called on the scheduler thread; the loop may already be gone if the client left.
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, item)
        except RuntimeError:
            holder[0].cancelled = True

    sequence = make_sequence(sink)
    holder.append(sequence)
    submit(sequence)
    try:
        while True:
            item = await chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        sequence.cancelled = True
