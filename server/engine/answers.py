"""A model answering prompts and reading its answers back: the one way the offline work does it
(extraction, strength sweeps and calibration, carrying a persona, baking, the closed-loop table).

Each caller builds its requests (``ask``), each with the seed its own scheme gives, and
``answer_all`` answers them in order, a bounded number at a time, reading each answer back
(``ReadBack``) as soon as it is written. A read-back is unsteered: the answer after the request's
prompt, without the request's steering or loop. Where reads are asked for together matters on the
HF engine (read-backs asked for together share forward passes), so ``answer_all`` reads an answer
inside its turn and ``read_all`` reads a list of answers with a bound of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from server.engine.base import Backend, ChatMessage, GenerationRequest, SamplingParams
from server.steering.closed_loop import LoopSpec, TokenTrace
from server.steering.plan import SteeringPlan

T = TypeVar("T")
# How many requests of a call are done (answered, and read back where asked), after each one.
Progress = Callable[[int], None]


def conversation(system: str, question: str) -> list[ChatMessage]:
    """The question, under a system prompt (none when empty)."""
    return [*([ChatMessage("system", system)] if system else []), ChatMessage("user", question)]


def ask(
    messages: str | Sequence[ChatMessage],
    *,
    max_tokens: int,
    seed: int | None,
    temperature: float = 1.0,
    steering: SteeringPlan | None = None,
    loop: LoopSpec | None = None,
    clamp_to_context: bool = True,
) -> GenerationRequest:
    """A chat request to answer: ``messages``, or a bare string as the user's turn."""
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, clamp_to_context=clamp_to_context
    )
    turns = [ChatMessage("user", messages)] if isinstance(messages, str) else list(messages)
    return GenerationRequest(sampling=sampling, messages=turns, steering=steering, loop=loop)


@dataclass(frozen=True)
class Answer:
    request: GenerationRequest  # what was answered: its messages, sampling (and seed), steering
    text: str
    token_ids: tuple[int, ...]
    traces: tuple[TokenTrace, ...] = ()  # per-token readings, where the request had a loop
    # Read back (``ReadBack``): the mean block outputs over the answer tokens ([blocks, hidden]; None
    # until read), and the summed negative log-likelihood (nats) over ``nll_tokens`` tokens (0 until read).
    activations: np.ndarray | None = None
    nll: float = 0.0
    nll_tokens: int = 0

    def in_tokens_of(self, reader: Backend) -> Answer:
        """The same answer in ``reader``'s tokens, as that model would write its text: how another
        model's answer is read back through this one."""
        return dataclasses.replace(self, token_ids=tuple(reader.answer_ids(self.text)))


@dataclass(frozen=True)
class ReadBack:
    """What to read back of each answer, unsteered: its activations (of the leading ``blocks``,
    default all) and its likelihood, after the request's conversation (``without_system``: without
    its system messages). ``only`` picks the answers to read; the others stay unread. An empty
    answer cannot be read back (the engine refuses it): skip it with ``only=written``."""

    activations: bool = False
    nll: bool = False
    blocks: int | None = None
    without_system: bool = False
    only: Callable[[Answer], bool] | None = None


def written(answer: Answer) -> bool:
    """Whether the model wrote anything (``ReadBack.only`` for reading the non-empty answers)."""
    return bool(answer.token_ids)


async def answer(backend: Backend, request: GenerationRequest) -> Answer:
    """``backend``'s answer to ``request``: its text, tokens and per-token traces."""
    text: list[str] = []
    ids: list[int] = []
    traces: list[TokenTrace] = []
    async for chunk in backend.generate(request):
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        traces.extend(chunk.traces or ())
    return Answer(request, "".join(text), tuple(ids), tuple(traces))


async def read_back(reader: Backend, given: Answer, what: ReadBack) -> Answer:
    """``given`` with what ``what`` asks read back by ``reader`` (likelihood first, then
    activations); unchanged where ``what.only`` leaves it out."""
    if what.only is not None and not what.only(given):
        return given
    messages = given.request.messages
    if what.without_system and messages is not None:
        messages = [message for message in messages if message.role != "system"]
    request = GenerationRequest(
        sampling=given.request.sampling, prompt=given.request.prompt, messages=messages
    )
    ids = list(given.token_ids)
    read = given
    if what.nll:
        nll, count = await reader.response_nll(request, ids)
        read = dataclasses.replace(read, nll=nll, nll_tokens=count)
    if what.activations:
        activations = await reader.response_activations(request, ids, what.blocks)
        read = dataclasses.replace(read, activations=activations)
    return read


async def _bounded(
    work: Sequence[Callable[[], Awaitable[T]]], concurrency: int | None, progress: Progress | None
) -> list[T]:
    """Each piece of ``work`` run, at most ``concurrency`` at once (a sliding window: the next
    starts as soon as one ends; None: all at once), their results in order."""
    gate = asyncio.Semaphore(concurrency) if concurrency is not None else None
    done = 0

    async def one(piece: Callable[[], Awaitable[T]]) -> T:
        nonlocal done
        if gate is None:
            result = await piece()
        else:
            async with gate:
                result = await piece()
        done += 1
        if progress is not None:
            progress(done)
        return result

    return list(await asyncio.gather(*(one(piece) for piece in work)))


async def answer_all(
    backend: Backend,
    requests: Sequence[GenerationRequest],
    *,
    concurrency: int | None = None,
    read: ReadBack | None = None,
    reader: Backend | None = None,
    progress: Progress | None = None,
) -> list[Answer]:
    """``backend``'s answers to ``requests``, in order, at most ``concurrency`` in flight (None:
    all at once); each read back as ``read`` asks within its turn, by ``reader`` (default:
    ``backend``; another model of the same tokenizer judges its answers)."""

    async def one(request: GenerationRequest) -> Answer:
        answered = await answer(backend, request)
        if read is None:
            return answered
        return await read_back(reader or backend, answered, read)

    return await _bounded(
        [lambda request=request: one(request) for request in requests], concurrency, progress
    )


async def read_all(
    reader: Backend, answers: Sequence[Answer], what: ReadBack, concurrency: int | None = None
) -> list[Answer]:
    """``answers`` read back by ``reader`` as ``what`` asks, in order, at most ``concurrency`` at
    once (None: all at once; 1: one after another)."""
    return await _bounded(
        [lambda given=given: read_back(reader, given, what) for given in answers], concurrency, None
    )
