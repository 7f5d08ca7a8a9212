"""The thread that owns a model, and what every engine's scheduler does around its steps.

Requests and tasks arrive from any thread through an inbox; one thread takes them in between steps,
so the model is only ever driven from that thread. A step that raises fails every request the
scheduler holds, never the server; ``stop()`` fails whatever is still there. The engine is dead
(``failure``) when its thread ends by an error or ``MAX_FAILED_STEPS`` steps in a row fail (a model
whose every step fails, as after a CUDA device assert, is in a state only a reload clears): it fails
what it holds and whatever arrives later, and the server restarts it (serving/engine_supervisor.py).
What a step does (admission, batching, decoding) is each engine's own: hf/scheduler.py,
llamacpp/scheduler.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from server.engine.base import TokenLogprob
from server.engine.sampling import next_token
from server.engine.sequence import Sequence, emit, fail
from server.errors import EngineDied, EngineFault, InvalidRequest
from server.steering.closed_loop import TokenTrace

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # failed steps in a row that make the engine dead


@dataclass(eq=False)
class ModelTask:
    """Work that needs the model between two steps (a read-back, a capture), run on the scheduler
    thread; its result or its error arrives in ``result``."""

    work: Callable[..., Any]
    result: Future[Any] = field(default_factory=Future)

    def run(self, *args: Any) -> None:
        """Call ``work(*args)`` unless the task was cancelled while it waited."""
        if not self.result.set_running_or_notify_cancel():
            return
        try:
            self.result.set_result(self.work(*args))
        except Exception as exc:
            self.result.set_exception(exc)

    def fail(self, error: BaseException) -> None:
        """End the task with ``error`` unless it was cancelled while it waited."""
        if self.result.set_running_or_notify_cancel():
            self.result.set_exception(error)


SequenceT = TypeVar("SequenceT", bound=Sequence)
TaskT = TypeVar("TaskT", bound=ModelTask)


class EngineScheduler(ABC, Generic[SequenceT, TaskT]):
    """The inbox, the thread and its loop; a subclass says what one step does."""

    def __init__(self, thread_name: str, eos_token_ids: set[int]) -> None:
        self._eos = eos_token_ids
        self._inbox: queue.SimpleQueue[list[SequenceT] | TaskT | None] = queue.SimpleQueue()
        self._waiting: deque[SequenceT] = deque()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._failed_steps = 0
        self._failure: str | None = None
        # Every sequence submitted and not yet dropped: a thread that dies mid-admission may hold one
        # in no list, and it must fail rather than wait forever.
        self._submitted: weakref.WeakSet[SequenceT] = weakref.WeakSet()
        self._submitted_lock = threading.Lock()

    def _start(self) -> None:
        """Start the thread: a subclass calls this once its own state exists."""
        self._thread.start()

    @property
    @abstractmethod
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve, or None while it can."""
        return self._failure

    def submit(self, sequences: list[SequenceT]) -> None:
        """Queue a request's sequences; they arrive together, so that one prefill may serve them."""
        with self._submitted_lock:
            self._submitted.update(sequences)
        self._inbox.put(sequences)
        if self._failure is not None:  # after the put: the dead thread may have drained the inbox
            self._fail_inbox()

    def _enqueue(self, task: TaskT) -> Future[Any]:
        self._inbox.put(task)
        if self._failure is not None:
            self._fail_inbox()
        return task.result

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    @abstractmethod
    def _step(self) -> None:
        """One round of work on the model: admit waiting requests, decode the running ones."""

    @abstractmethod
    def _take_task(self, task: TaskT) -> None:
        """A task arrived: run it now, or keep it until the model is free for it."""

    @abstractmethod
    def _running(self) -> list[SequenceT]:
        """The sequences being decoded."""

    @abstractmethod
    def _forget_running(self) -> None:
        """Drop every running sequence and whatever model state they held (their KV cache)."""

    def _busy(self) -> bool:
        return bool(self._waiting) or self.num_running > 0

    def _loop(self) -> None:
        try:
            while self._pull_inbox(block=not self._busy()):
                # A client that left while its request waited: it leaves the line now, not at its turn.
                if any(sequence.cancelled for sequence in self._waiting):
                    self._waiting = deque(s for s in self._waiting if not s.cancelled)
                self._step_once()
        except BaseException as exc:  # the thread ends: nothing it holds or is sent may wait forever
            logger.exception("%s: the engine's thread stopped", self._thread.name)
            self._die(f"the engine's thread stopped: {exc!r}")

    def _step_once(self) -> None:
        failed_before = self._failed_steps
        try:
            self._step()
        except Exception as exc:  # a failed step fails what the scheduler holds, never the server
            logger.exception("%s: generation step failed", self._thread.name)
            self._failed_steps += 1
            self._fail_all(EngineFault(f"the engine failed a step: {exc}"))
            last: BaseException = exc
        else:
            if self._failed_steps == failed_before:  # nothing failed in it, not even a prefill
                self._failed_steps = 0
            last = RuntimeError("a prefill failed")
        if self._failed_steps >= MAX_FAILED_STEPS:
            self._die(f"{self._failed_steps} steps in a row failed, the last with: {last!r}")
            raise EngineDied(self._failure)

    def _die(self, reason: str) -> None:
        """Fail what the scheduler holds and whatever is sent from now on."""
        if self._failure is None:
            self._failure = reason
        error = EngineDied(f"the engine died: {self._failure}")
        self._fail_all(error)
        self._fail_held_tasks(error)
        self._fail_inbox()
        with self._submitted_lock:
            unfinished = [sequence for sequence in self._submitted if not sequence.finished]
        fail(unfinished, error)

    def _fail_held_tasks(self, error: BaseException) -> None:
        """Fail the tasks a subclass keeps until the model is free for them (none here)."""

    def _fail_inbox(self) -> None:
        error = EngineDied(f"the engine died: {self._failure}")
        try:
            while True:
                item = self._inbox.get_nowait()
                if isinstance(item, ModelTask):
                    item.fail(error)
                elif item is not None:
                    fail(item, error)
        except queue.Empty:
            return

    def _pull_inbox(self, block: bool) -> bool:
        """Move submitted requests to the waiting line and hand over tasks; False once stop() was called."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    self._shut_down()
                    return False
                if isinstance(item, ModelTask):
                    self._take_task(item)
                else:
                    self._waiting.extend(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _shut_down(self) -> None:
        self._fail_all(EngineFault("the engine is shutting down"))
        self._failure = self._failure or "the engine was shut down"
        self._fail_inbox()  # what was sent after stop() must not wait for a thread that has ended

    def _fail_all(self, error: BaseException) -> None:
        fail([*self._running(), *self._waiting], error)
        self._waiting = deque()
        self._forget_running()

    def _fail_prefill(self, sequences: list[SequenceT], error: BaseException) -> None:
        """A prompt that fails fails alone: the batch goes on. It counts as a failed step (a model
        whose every forward fails must be found dead however its requests arrive)."""
        if isinstance(error, InvalidRequest):  # the request's own fault: it says what to change
            fail(sequences, error)
            return
        logger.exception("prefill failed")
        self._failed_steps += 1
        fail(sequences, EngineFault(f"the engine failed the prompt: {error}"))

    def _emit(
        self,
        sequence: SequenceT,
        token: int,
        logprob: TokenLogprob | None = None,
        trace: TokenTrace | None = None,
    ) -> None:
        emit(sequence, token, self._eos, logprob, trace)

    def _choose_and_emit(
        self, sequence: SequenceT, logits: torch.Tensor, trace: TokenTrace | None = None
    ) -> None:
        """Choose the sequence's next token from its logits [vocab] and send it."""
        self._emit(sequence, *next_token(logits, sequence, self._eos), trace)
