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
A request that took a control-vector lane a moment before others with another plan arrived (the
first of a burst) moves into the per-row lane once it runs, its KV cells copied over, so that a step
decodes one batch, not two.

A sequence reserves KV cells for its prompt and its max_tokens, so a lane never runs out of cache
mid-generation. Requests are admitted in arrival order: one that finds no lane waits, and so do
those behind it (no request starves).

Positions follow server/steering/plan.py, as on the HF backend: a prompt is fed in runs of equal
steering (a control vector is on or off for a whole decode), and a generated token is steered when
the plan steers generated tokens.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from server.engine.llamacpp.lane import Lane, TokenSlot
from server.engine.llamacpp.steering import RowSteering, per_row_additions, per_row_edits
from server.engine.scheduler import EngineScheduler, ModelTask
from server.engine.sequence import Sequence, blocks_read, holds_last
from server.steering.closed_loop import TokenTrace
from server.steering.operators import BlockEdit
from server.steering.plan import Positions, prompt_position_mask, steers_generated_tokens


@dataclass(eq=False)
class LaneSequence(Sequence):
    steering_key: str = ""  # the plan's fingerprint; "" when unsteered
    steering: np.ndarray | None = None  # the control-vector buffer, block 1 first
    deltas: dict[int, np.ndarray] = field(default_factory=dict)  # block -> strength * vector
    edits: dict[int, tuple[BlockEdit, ...]] = field(default_factory=dict)  # the plan's ablates and caps
    slot: int = -1
    position: int = 0  # tokens of this sequence in its lane's cache
    steers_generated: bool = field(init=False, default=False)  # read on every decode step
    stays: bool = False  # its cells found no room in the per-row lane once: it ends where it is

    def __post_init__(self) -> None:
        self.steers_generated = self.plan is not None and steers_generated_tokens(self.plan.positions)

    @property
    def reservation(self) -> int:
        """KV cells this sequence may come to hold: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_new_tokens

    def prompt_steering(self) -> list[bool]:
        """Which prompt tokens are steered."""
        if self.plan is None:
            return [False] * len(self.prompt_ids)
        return prompt_position_mask(self.plan.positions, len(self.prompt_ids)).tolist()

    def prompt_rows(self, extra: list[tuple[dict[int, torch.Tensor], Positions]]) -> list[RowSteering]:
        """Per prompt token, what the per-row lane adds: the plan where it steers, and ``extra``
        (block -> addition, positions) where each part's positions reach."""
        steered = self.prompt_steering()
        if not extra:  # the common case: the plan's own rows, no copies
            return [(self.deltas, plan_steers) for plan_steers in steered]
        length = len(self.prompt_ids)
        masks = [(deltas, prompt_position_mask(positions, length)) for deltas, positions in extra]
        rows: list[RowSteering] = []
        for position, plan_steers in enumerate(steered):
            added = dict(self.deltas) if plan_steers else {}
            for deltas, mask in masks:
                if mask[position]:
                    for block, delta in deltas.items():
                        added[block] = added[block] + delta.numpy() if block in added else delta.numpy()
            rows.append((added, bool(added)))
        return rows

    def step_steering(self) -> RowSteering:
        """What the per-row lane adds at this sequence's next generated token (``generated_deltas``;
        without a loop, the plan's numpy copies made once)."""
        if self.loop is None:
            return self.deltas, self.steers_generated
        return {block: delta.numpy() for block, delta in (self.generated_deltas() or {}).items()}, True


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
class LaneTask(ModelTask):
    """Work that needs a whole empty lane (scoring a response): ``work(lane)``."""

    per_row: bool = False  # needs the per-row lane (reading block outputs)


def _on_a_clean_lane(work: Callable[[Lane], Any]) -> Callable[[Lane], Any]:
    """``work`` run on an empty, unsteered lane, which it leaves empty."""

    def run(lane: Lane) -> Any:
        try:
            lane.steer(None)
            lane.clear()
            return work(lane)
        finally:
            lane.clear()

    return run


def _runs(steered: list[bool]) -> list[tuple[int, int]]:
    """(begin, end) of each run of equal values."""
    runs: list[tuple[int, int]] = []
    begin = 0
    for end in range(1, len(steered) + 1):
        if end == len(steered) or steered[end] != steered[begin]:
            runs.append((begin, end))
            begin = end
    return runs


class LaneScheduler(EngineScheduler[LaneSequence, LaneTask]):
    def __init__(self, lanes: list[Lane], eos_token_ids: set[int], hidden_size: int) -> None:
        super().__init__("llamacpp-scheduler", eos_token_ids)
        self._states = [LaneState(lane) for lane in lanes]
        self._hidden = hidden_size
        self._tasks: deque[LaneTask] = deque()
        self._start()

    @property
    def num_running(self) -> int:
        return sum(len(state.rows) for state in self._states)

    @property
    def lanes_in_use(self) -> int:
        return sum(bool(state.rows) for state in self._states)

    def rows_per_lane(self) -> list[tuple[bool, int]]:
        """(per-row lane?, running sequences) of every lane: for tests and metrics."""
        return [(state.lane.per_row, len(state.rows)) for state in self._states]

    def run_on_lane(self, work: Callable[[Lane], Any], per_row: bool = False) -> Future[Any]:
        """Run ``work`` on an empty lane (the per-row one if asked) between two steps; its result
        arrives in the future."""
        return self._enqueue(LaneTask(_on_a_clean_lane(work), per_row=per_row))

    def _busy(self) -> bool:
        return bool(self._tasks) or super()._busy()

    def _step(self) -> None:
        self._run_tasks()
        self._admit()
        self._gather_into_per_row()
        for state in self._states:
            self._drop_rows(state, lambda s: s.cancelled)
            if state.rows:
                self._decode_step(state)

    def _take_task(self, task: LaneTask) -> None:
        self._tasks.append(task)  # it runs once a lane is empty

    def _shut_down(self) -> None:
        super()._shut_down()
        for task in self._tasks:
            task.result.cancel()

    def _fail_held_tasks(self, error: BaseException) -> None:
        for task in self._tasks:
            task.fail(error)
        self._tasks.clear()

    def _empty_lane(self, per_row: bool | None = None) -> LaneState | None:
        for state in self._states:
            if not state.rows and (per_row is None or state.lane.per_row == per_row):
                return state
        return None

    def _run_tasks(self) -> None:
        while self._tasks and (state := self._empty_lane(True if self._tasks[0].per_row else None)):
            self._tasks.popleft().run(state.lane)

    def _lane_for(self, sequence: LaneSequence) -> LaneState | None:
        key = sequence.steering_key
        vector_lanes = [s for s in self._states if not s.lane.per_row]
        mixed = next((s for s in self._states if s.lane.per_row and s.has_room(sequence)), None)
        if sequence.loop is not None or sequence.capture is not None or sequence.edits:
            # Its blocks are read, its steering may change token by token, or it edits block
            # outputs (no control vector can): per row only.
            return mixed
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
                logits, trace = self._open(state, sequence)
                self._choose_and_emit(sequence, torch.from_numpy(logits), trace)
            except Exception as exc:
                self._fail_prefill([sequence], exc)
            state.rows.append(sequence)
            self._drop_rows(state, lambda s: s.finished)

    def _gather_into_per_row(self) -> None:
        """Each busy lane costs a llama_decode per step. While the per-row lane runs, move into it the
        rows of a control-vector lane that it has room for, their cache cells copied over: typically
        the first request of a burst of mixed personas, which found nothing else running and took a
        control-vector lane a moment before the others arrived."""
        mixed = next((s for s in self._states if s.lane.per_row and s.rows), None)
        if mixed is None:
            return
        for state in self._states:
            rows = [sequence for sequence in state.rows if not sequence.stays]
            if state.lane.per_row or not rows or len(mixed.lane.free_slots) < len(rows):
                continue
            if mixed.reserved + sum(s.reservation for s in rows) > mixed.lane.context_tokens:
                continue
            moved = [sequence for sequence in rows if self._move(state, mixed, sequence)]
            state.rows = [sequence for sequence in state.rows if sequence not in moved]
            if not state.rows:
                state.key, state.steering = None, None

    def _move(self, source: LaneState, target: LaneState, sequence: LaneSequence) -> bool:
        """Move a running sequence's cells into a free slot of ``target``; False (and nothing moved)
        when its cache has no run of free cells that long."""
        slot = target.lane.free_slots.pop()
        if not source.lane.copy_cells(sequence.slot, target.lane, slot):
            target.lane.forget(slot)
            sequence.stays = True  # copying its state out again each step would cost each step
            return False
        source.lane.forget(sequence.slot)
        sequence.slot = slot
        target.rows.append(sequence)
        return True

    def _open(self, state: LaneState, sequence: LaneSequence) -> tuple[np.ndarray, TokenTrace | None]:
        """Prefill a sequence: the logits of its last prompt token and, with a closed loop, the trace
        of the pass that reads it (a rule that fires there has the prompt prefilled again with it)."""
        loop = sequence.loop
        if loop is None:
            return self._prefill(state, sequence)[0], None
        logits, outputs = self._prefill(state, sequence, read=loop.spec.num_blocks)
        added = sequence.plan.deltas if sequence.plan is not None else {}
        trace = loop.observe(torch.from_numpy(outputs[0]), added)
        if loop.rules_on:
            rules = loop.rules_on
            state.lane.drop_cells(sequence.slot)
            logits, _ = self._prefill(state, sequence, extra=loop.prompt_rules())
            loop.rerun()
            trace = dataclasses.replace(trace, rules=rules)
        return logits, trace

    def _prefill(
        self,
        state: LaneState,
        sequence: LaneSequence,
        read: int = 0,
        extra: list[tuple[dict[int, torch.Tensor], Positions]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Feed the prompt; the logits of its last token and, when ``read`` (per-row lane), the
        outputs of its first ``read`` blocks there [1, read, hidden]. ``extra``: more to add."""
        ids, lane = sequence.prompt_ids, state.lane
        steered = sequence.prompt_steering()
        rows = sequence.prompt_rows(extra or []) if lane.per_row else []
        # A control vector is on or off for a whole decode: feed the prompt in runs of equal steering.
        runs = [(0, len(ids))] if lane.per_row else _runs(steered)
        logits: list[np.ndarray] = []
        outputs = None
        for begin, end in runs:
            if not lane.per_row:
                lane.steer(state.steering if steered[begin] else None)
            for start in range(begin, end, lane.batch_capacity):
                stop = min(start + lane.batch_capacity, end)
                slots = [TokenSlot(ids[p], p, sequence.slot, p == len(ids) - 1) for p in range(start, stop)]
                additions, edits = None, None
                if lane.per_row and any(steers for _, steers in rows[start:stop]):
                    additions = per_row_additions(rows[start:stop], self._hidden)
                if lane.per_row and sequence.edits:
                    editing = [(sequence.edits, steers) for steers in steered[start:stop]]
                    edits = per_row_edits(editing, self._hidden)
                if read and stop == len(ids):
                    logits, outputs = lane.decode_reading(slots, additions, [len(slots) - 1], read, edits)
                else:
                    logits = lane.decode(slots, additions, edits)
                sequence.position = stop
        return logits[-1], outputs

    def _decode_step(self, state: LaneState) -> None:
        additions, edits = None, None
        if state.lane.per_row:
            additions = per_row_additions([s.step_steering() for s in state.rows], self._hidden)
            edits = per_row_edits([(s.edits, s.steers_generated) for s in state.rows], self._hidden)
        else:
            state.lane.steer(state.steering if state.rows[0].steers_generated else None)
        slots = [TokenSlot(s.output_ids[-1], s.position, s.slot, True) for s in state.rows]
        reading = [row for row, s in enumerate(state.rows) if s.loop is not None or s.capture is not None]
        traces: dict[int, TokenTrace] = {}
        if reading:
            num_blocks = max(blocks_read(state.rows[row]) for row in reading)
            rows, outputs = state.lane.decode_reading(slots, additions, reading, num_blocks, edits)
            for row, row_outputs in zip(reading, outputs, strict=True):
                sequence = state.rows[row]
                if sequence.capture is not None:  # the fed token is a response token
                    sequence.capture.add(torch.from_numpy(row_outputs[: sequence.capture.num_blocks]))
                if sequence.loop is not None and not holds_last(sequence):
                    traces[row] = sequence.loop.observe(torch.from_numpy(row_outputs))
        else:
            rows = state.lane.decode(slots, additions, edits)
        for row, (sequence, logits) in enumerate(zip(state.rows, rows, strict=True)):
            sequence.position += 1
            if holds_last(sequence):
                # This step read its last token: the final chunk goes out now, with the means.
                sequence.finished = True
                sequence.sink(sequence.capture.release())  # type: ignore[union-attr]
            elif sequence.sampling.plain_argmax:
                self._emit(sequence, int(np.argmax(logits)), None, traces.get(row))
            else:
                self._choose_and_emit(sequence, torch.from_numpy(logits), traces.get(row))
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

    def _running(self) -> list[LaneSequence]:
        return [sequence for state in self._states for sequence in state.rows]

    def _forget_running(self) -> None:
        for state in self._states:
            for sequence in state.rows:
                state.lane.forget(sequence.slot)
            state.rows, state.key, state.steering = [], None, None
            state.lane.clear()
