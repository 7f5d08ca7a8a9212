"""Continuous batching over a pool of llama.cpp contexts ("lanes") that share one loaded model.

One thread drives every lane; each step decodes every busy lane once (one llama_decode each). Two
kinds of lane (lane.py):
- control-vector lanes carry the requests of one steering plan (one fingerprint, or none) at a
  time, steered by llama.cpp's own control vector at no cost per token;
- the per-row lane carries requests with different plans in one batch, each token getting its own
  vector through the evaluation callback (a small cost on every decode).

Routing, to decode as few batches per step as possible: while the per-row lane runs anything, a
new request joins it; else it joins a control-vector lane that carries its plan; else, if another
plan is running or waiting, it goes to the per-row lane (mixed personas batch together); else it
takes an empty control-vector lane (one plan at a time, or no steering, keeps the free path).

A sequence reserves KV cells for its prompt and its max_tokens, so a lane never runs out of cache
mid-generation. Requests are admitted in arrival order: one that finds no lane waits, and so do
those behind it (no request starves).

Positions, as on the HF backend: ``all`` steers every token; ``prompt`` the prompt tokens (on during
prefill, off while decoding); ``response`` the last prompt token and the generated ones.
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
    deltas: dict[int, np.ndarray] = field(default_factory=dict)  # block -> strength * vector
    slot: int = -1
    position: int = 0  # tokens of this sequence in its lane's cache

    @property
    def reservation(self) -> int:
        """KV cells this sequence may come to hold: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def steers_generated(self) -> bool:
        return self.plan is not None and self.plan.positions in (Positions.ALL, Positions.RESPONSE)


@dataclass(eq=False)
class LaneState:
    lane: Lane
    key: str | None = None  # control-vector lanes: the plan of the sequences in it; None while empty
    steering: np.ndarray | None = None
    rows: list[LaneSequence] = field(default_factory=list)

    @property
    def reserved(self) -> int:
        return sum(sequence.reservation for sequence in self.rows)

    def has_room(self, sequence: LaneSequence) -> bool:
        return bool(self.lane.free_slots) and self.reserved + sequence.reservation <= self.lane.context_tokens


@dataclass(eq=False)
class LaneTask:
    """Work that needs a whole empty lane (scoring a response), run on the scheduler thread."""

    work: Callable[[Lane], Any]
    per_row: bool = False  # needs the per-row lane (reading block outputs)
    result: Future[Any] = field(default_factory=Future)


def _additions(rows: list[tuple[LaneSequence, int]], hidden: int) -> dict[int, np.ndarray]:
    """block -> [len(rows), hidden]: for each (sequence, steered?) row, its delta or zeros."""
    blocks = {block for sequence, steered in rows if steered for block in sequence.deltas}
    additions = {block: np.zeros((len(rows), hidden), dtype=np.float32) for block in blocks}
    for index, (sequence, steered) in enumerate(rows):
        if steered:
            for block, delta in sequence.deltas.items():
                additions[block][index] = delta
    return additions


class LaneScheduler:
    def __init__(self, lanes: list[Lane], eos_token_ids: set[int], hidden_size: int) -> None:
        self._states = [LaneState(lane) for lane in lanes]
        self._eos = eos_token_ids
        self._hidden = hidden_size
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
        return sum(bool(state.rows) for state in self._states)

    def rows_per_lane(self) -> list[tuple[bool, int]]:
        """(per-row lane?, running sequences) of every lane: for tests and metrics."""
        return [(state.lane.per_row, len(state.rows)) for state in self._states]

    def submit(self, sequence: LaneSequence) -> None:
        self._inbox.put(sequence)

    def run_on_lane(self, work: Callable[[Lane], Any], per_row: bool = False) -> Future[Any]:
        """Run ``work`` on an empty lane (the per-row one if asked) between two steps; its result
        arrives in the future."""
        task = LaneTask(work, per_row)
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

    def _empty_lane(self, per_row: bool | None = None) -> LaneState | None:
        for state in self._states:
            if not state.rows and (per_row is None or state.lane.per_row == per_row):
                return state
        return None

    def _run_tasks(self) -> None:
        while self._tasks and (state := self._empty_lane(True if self._tasks[0].per_row else None)):
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
        key = sequence.steering_key
        vector_lanes = [s for s in self._states if not s.lane.per_row]
        mixed = next((s for s in self._states if s.lane.per_row and s.has_room(sequence)), None)
        if mixed is not None and mixed.rows:
            return mixed  # one batch for everything beats a batch per plan
        for state in vector_lanes:
            if state.rows and state.key == key and state.has_room(sequence):
                return state
        # Another plan running, or waiting behind this request (a burst of mixed personas).
        others = [s.key for s in vector_lanes if s.rows] + [w.steering_key for w in self._waiting]
        if mixed is not None and any(other != key for other in others):
            return mixed
        return self._empty_lane(per_row=False) or mixed

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
            if not state.lane.per_row and not state.rows:
                state.key, state.steering = sequence.steering_key, sequence.steering
                state.lane.clear()
            sequence.slot = state.lane.free_slots.pop()
            sequence.mark_scheduled()
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
        # The prompt tokens from first_steered on are steered: all, none, or (response) the last one.
        if sequence.plan is None:
            first_steered = len(ids)
        elif sequence.plan.positions is Positions.RESPONSE:
            first_steered = len(ids) - 1
        else:
            first_steered = 0
        # A control vector is on or off for a whole decode: split the prompt where steering starts.
        phases = [(0, len(ids))] if state.lane.per_row else [(0, first_steered), (first_steered, len(ids))]
        capacity = state.lane.batch_capacity
        logits: list[np.ndarray] = []
        for begin, end in phases:
            if begin == end:
                continue
            if not state.lane.per_row:
                state.lane.steer(state.steering if begin >= first_steered else None)
            for start in range(begin, end, capacity):
                stop = min(start + capacity, end)
                slots = [TokenSlot(ids[p], p, sequence.slot, p == len(ids) - 1) for p in range(start, stop)]
                additions = None
                if state.lane.per_row and sequence.deltas:
                    additions = _additions(
                        [(sequence, p >= first_steered) for p in range(start, stop)], self._hidden
                    )
                logits = state.lane.decode(slots, additions)
                sequence.position = stop
        return logits[-1]

    def _decode_step(self, state: LaneState) -> None:
        additions = None
        if state.lane.per_row:
            additions = _additions([(s, s.steers_generated) for s in state.rows], self._hidden)
        else:
            state.lane.steer(state.steering if state.rows[0].steers_generated else None)
        slots = [TokenSlot(s.output_ids[-1], s.position, s.slot, True) for s in state.rows]
        rows = state.lane.decode(slots, additions)
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
