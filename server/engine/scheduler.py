"""The thread that owns a model, and what every engine's scheduler does around its steps.

Requests and tasks arrive from any thread through an inbox; one thread takes them in between steps,
so the model is only ever driven from that thread. A step that raises fails every request the
scheduler holds, never the server; ``stop()`` fails whatever is still there. What a step does
(admission, batching, decoding) is each engine's own: hf/scheduler.py, llamacpp/scheduler.py.
"""

from __future__ import annotations

import logging
import queue
import threading
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
from server.steering.closed_loop import TokenTrace

logger = logging.getLogger(__name__)


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


SequenceT = TypeVar("SequenceT", bound=Sequence)
TaskT = TypeVar("TaskT", bound=ModelTask)


class EngineScheduler(ABC, Generic[SequenceT, TaskT]):
    """The inbox, the thread and its loop; a subclass says what one step does."""

    def __init__(self, thread_name: str, eos_token_ids: set[int]) -> None:
        self._eos = eos_token_ids
        self._inbox: queue.SimpleQueue[list[SequenceT] | TaskT | None] = queue.SimpleQueue()
        self._waiting: deque[SequenceT] = deque()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def _start(self) -> None:
        """Start the thread: a subclass calls this once its own state exists."""
        self._thread.start()

    @property
    @abstractmethod
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    def submit(self, sequences: list[SequenceT]) -> None:
        """Queue a request's sequences; they arrive together, so that one prefill may serve them."""
        self._inbox.put(sequences)

    def _enqueue(self, task: TaskT) -> Future[Any]:
        self._inbox.put(task)
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
        while self._pull_inbox(block=not self._busy()):
            # A client that left while its request waited: it leaves the line now, not at its turn.
            if any(sequence.cancelled for sequence in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
            try:
                self._step()
            except Exception as exc:  # a failed step fails what the scheduler holds, never the server
                logger.exception("%s: generation step failed", self._thread.name)
                self._fail_all(exc)

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
        self._fail_all(RuntimeError("the engine is shutting down"))

    def _fail_all(self, error: BaseException) -> None:
        fail([*self._running(), *self._waiting], error)
        self._waiting = deque()
        self._forget_running()

    @staticmethod
    def _fail_prefill(sequences: list[SequenceT], error: BaseException) -> None:
        """A prompt that fails fails alone: the batch goes on."""
        logger.exception("prefill failed")
        fail(sequences, error)

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
