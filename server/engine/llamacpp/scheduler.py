"""Continuous batching over a pool of llama.cpp contexts ("lanes"), each with its own control vector.

One thread drives every lane. A request goes to a lane already carrying its steering plan (same
fingerprint) with a free sequence slot, else to an empty lane, which takes its plan; it is prefilled
at once and then decoded together with the lane's other sequences, one llama_decode per lane and
step. A sequence reserves KV cells for its prompt and its max_tokens, so a lane never runs out of
cache mid-generation. Requests are admitted in arrival order: one that finds no lane waits, and so
do those behind it, until a lane has room (no request starves behind a stream of others).

Positions, as on the HF backend: ``all`` steers every token; ``prompt`` steers the prompt tokens
(the vector is on during prefill, off while decoding); ``response`` steers the last prompt token and
the generated ones (off for the rest of the prompt).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from server.engine.llamacpp.lane import Lane, TokenSlot
from server.engine.sampling import sample_one
from server.engine.sequence import Sequence, emit, fail
from server.steering.plan import Positions

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class LaneSequence(Sequence):
    steering_key: str = ""  # the plan's fingerprint; "" when unsteered
    steering: np.ndarray | None = None  # the control-vector buffer, block 1 first
    slot: int = -1
    position: int = 0  # tokens of this sequence in its lane's cache

    @property
    def reservation(self) -> int:
        """KV cells this sequence may come to hold: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(eq=False)
class LaneState:
    lane: Lane
    key: str | None = None  # steering key of the sequences in it; None while empty
    steering: np.ndarray | None = None
    rows: list[LaneSequence] = field(default_factory=list)

    @property
    def reserved(self) -> int:
        return sum(sequence.reservation for sequence in self.rows)


@dataclass(eq=False)
class LaneTask:
    """Work that needs a whole empty lane (scoring a response), run on the scheduler thread."""

    work: Callable[[Lane], Any]
    result: Future[Any] = field(default_factory=Future)


class LaneScheduler:
    def __init__(self, lanes: list[Lane], eos_token_ids: set[int]) -> None:
        self._states = [LaneState(lane) for lane in lanes]
        self._eos = eos_token_ids
        self._inbox: queue.SimpleQueue[LaneSequence | LaneTask | None] = queue.SimpleQueue()
        self._waiting: deque[LaneSequence] = deque()
        self._tasks: deque[LaneTask] = deque()
        self._thread = threading.Thread(target=self._loop, name="llamacpp-scheduler", daemon=True)
        self._thread.start()

    @property
    def num_running(self) -> int:
        return sum(len(state.rows) for state in self._states)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    @property
    def lanes_in_use(self) -> int:
        return sum(state.key is not None for state in self._states)

    def submit(self, sequence: LaneSequence) -> None:
        self._inbox.put(sequence)

    def run_on_lane(self, work: Callable[[Lane], Any]) -> Future[Any]:
        """Run ``work`` on an empty lane between two steps; its result arrives in the future."""
        task = LaneTask(work)
        self._inbox.put(task)
        return task.result

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _busy(self) -> bool:
        return bool(self._waiting or self._tasks or self.num_running)

    def _loop(self) -> None:
        while self._pull_inbox(block=not self._busy()):
            try:
                self._run_tasks()
                self._admit()
                for state in self._states:
                    self._drop_rows(state, lambda s: s.cancelled)
                    if state.rows:
                        self._decode_step(state)
            except Exception as exc:  # a failed decode fails what is running, never the server
                logger.exception("llama.cpp generation step failed")
                self._fail_all(exc)

    def _pull_inbox(self, block: bool) -> bool:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    self._fail_all(RuntimeError("the engine is shutting down"))
                    for task in self._tasks:
                        task.result.cancel()
                    return False
                if isinstance(item, LaneTask):
                    self._tasks.append(item)
                else:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _empty_lane(self) -> LaneState | None:
        return next((state for state in self._states if state.key is None), None)

    def _run_tasks(self) -> None:
        while self._tasks and (state := self._empty_lane()) is not None:
            task = self._tasks.popleft()
            if not task.result.set_running_or_notify_cancel():
                continue
            try:
                state.lane.steer(None)
                state.lane.clear()
                task.result.set_result(task.work(state.lane))
            except Exception as exc:
                task.result.set_exception(exc)
            finally:
                state.lane.clear()

    def _lane_for(self, sequence: LaneSequence) -> LaneState | None:
        """A lane with this plan, a free slot and room for the sequence's tokens, else an empty lane."""
        for state in self._states:
            if (
                state.key == sequence.steering_key
                and state.lane.free_slots
                and state.reserved + sequence.reservation <= state.lane.context_tokens
            ):
                return state
        return self._empty_lane()

    def _admit(self) -> None:
        while self._waiting:
            sequence = self._waiting[0]
            if sequence.cancelled:
                self._waiting.popleft()
                continue
            state = self._lane_for(sequence)
            if state is None:
                return  # in arrival order: the rest wait with it
            self._waiting.popleft()
            if state.key is None:
                state.key, state.steering = sequence.steering_key, sequence.steering
                state.lane.clear()
            sequence.slot = state.lane.free_slots.pop()
            try:
                logits = self._prefill(state, sequence)
                emit(sequence, sample_one(torch.from_numpy(logits), sequence.sampling, sequence.generator),
                     self._eos)  # fmt: skip
            except Exception as exc:  # a prompt that fails fails alone
                logger.exception("prefill failed")
                fail([sequence], exc)
            state.rows.append(sequence)
            self._drop_rows(state, lambda s: s.finished)

    def _prefill(self, state: LaneState, sequence: LaneSequence) -> np.ndarray:
        """Feed the prompt; the logits of its last token."""
        ids = sequence.prompt_ids
        if sequence.plan is None:
            phases = [(ids, None)]
        elif sequence.plan.positions is Positions.RESPONSE:
            phases = [(ids[:-1], None), (ids[-1:], state.steering)]
        else:
            phases = [(ids, state.steering)]
        capacity = state.lane.batch_capacity
        logits: list[np.ndarray] = []
        for tokens, steering in phases:
            if not tokens:
                continue
            state.lane.steer(steering)
            for start in range(0, len(tokens), capacity):
                chunk = tokens[start : start + capacity]
                last = sequence.position + len(chunk) == len(ids)
                slots = [
                    TokenSlot(token, sequence.position + i, sequence.slot, last and i == len(chunk) - 1)
                    for i, token in enumerate(chunk)
                ]
                logits = state.lane.decode(slots)
                sequence.position += len(chunk)
        return logits[-1]

    def _decode_step(self, state: LaneState) -> None:
        plan = state.rows[0].plan
        steers_generated = plan is not None and plan.positions in (Positions.ALL, Positions.RESPONSE)
        state.lane.steer(state.steering if steers_generated else None)
        slots = [TokenSlot(s.output_ids[-1], s.position, s.slot, True) for s in state.rows]
        rows = state.lane.decode(slots)
        for sequence, logits in zip(state.rows, rows, strict=True):
            sequence.position += 1
            if sequence.sampling.greedy:
                token = int(np.argmax(logits))
            else:
                token = sample_one(torch.from_numpy(logits), sequence.sampling, sequence.generator)
            emit(sequence, token, self._eos)
        self._drop_rows(state, lambda s: s.finished)

    def _drop_rows(self, state: LaneState, leaves: Callable[[LaneSequence], bool]) -> None:
        keep = []
        for sequence in state.rows:
            if leaves(sequence):
                state.lane.forget(sequence.slot)
            else:
                keep.append(sequence)
        state.rows = keep
        if not keep:
            state.key, state.steering = None, None

    def _fail_all(self, error: BaseException) -> None:
        fail([*self._waiting, *(s for state in self._states for s in state.rows)], error)
        self._waiting = deque()
        for state in self._states:
            for sequence in state.rows:
                state.lane.forget(sequence.slot)
            state.rows, state.key, state.steering = [], None, None
            state.lane.clear()
