"""Steering inside a vLLM worker: vector sets held by key, and each forward's steering and reads
written into the model's persistent buffers (in_graph.py) before it runs, read out after.

A forward pass of vLLM's V1 model runner carries the tokens of many requests in one flat tensor; the
tokens ``query_start_loc[i]:query_start_loc[i + 1]`` belong to the runner's i-th request, in steps
that mix prefill and decode too. Before each forward the worker works out, per token, the slot it
adds (with its scale) and the read row its block outputs go to, and copies those into the buffers;
the compiled forward does the rest. After the forward the read rows come back in one copy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from server.engine.vllm.capture import StepCapture, WorkerCaptures
from server.engine.vllm.in_graph import SteeringBuffers
from server.engine.vllm.slots import SlotTable
from server.engine.vllm.wire import CaptureSpec, SteeringRef, slot_key, unpack
from server.engine.vllm.worker_loops import (
    LoopPart,
    LoopRead,
    LoopState,
    WorkerLoops,
    loop_parts,
    loop_read,
)
from server.steering.plan import Positions, steered_position_mask

logger = logging.getLogger(__name__)

Vectors = dict[int, torch.Tensor]


@dataclass(frozen=True)
class BatchRow:
    """One request's tokens in the flat batch of a forward."""

    start: int
    end: int
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens before this forward's: the position of its first token
    ref: SteeringRef | None
    capture: CaptureSpec | None = None
    loop: LoopState | None = None

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.num_computed_tokens, self.num_computed_tokens + self.end - self.start)


@dataclass(frozen=True)
class Addition:
    """Tokens of the flat batch that add one slot's vectors, at one scale."""

    tokens: np.ndarray
    key: Hashable
    vectors: Callable[[], Vectors]
    scale: float = 1.0
    fresh: bool = False  # the vectors change from forward to forward: written every time


@dataclass
class StepReads:
    """What a forward reads, and for whom: its captures and loop readings, by read row."""

    captures: list[StepCapture] = field(default_factory=list)
    loops: list[tuple[LoopRead, int]] = field(default_factory=list)  # (reading, read row)
    rows: int = 0  # read rows in use, from 1

    def __bool__(self) -> bool:
        return bool(self.captures or self.loops)


class TokenStaging:
    """Host arrays the token buffers are copied from: pinned on CUDA, so that the copies do not wait
    for the GPU; a new forward's arrays are written only once the last forward's copies are done."""

    def __init__(self, max_tokens: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        make = lambda dtype: torch.zeros(max_tokens, dtype=dtype, pin_memory=cuda)  # noqa: E731
        self._slot, self._scale, self._read = make(torch.long), make(torch.float32), make(torch.long)
        self._edit = make(torch.long)
        self._copied = torch.cuda.Event() if cuda else None

    def arrays(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Zeroed numpy views of the first ``count`` entries: slot, scale, read row, edit slot."""
        if self._copied is not None:
            self._copied.synchronize()
        tensors = (self._slot, self._scale, self._read, self._edit)
        views = tuple(tensor.numpy()[:count] for tensor in tensors)
        for view in views:
            view.fill(0)
        return views  # type: ignore[return-value]

    def copy_to(self, buffers: SteeringBuffers, count: int) -> None:
        pinned = self._copied is not None
        buffers.token_slot[:count].copy_(self._slot[:count], non_blocking=pinned)
        buffers.token_scale[:count].copy_(self._scale[:count], non_blocking=pinned)
        buffers.token_read[:count].copy_(self._read[:count], non_blocking=pinned)
        buffers.token_edit[:count].copy_(self._edit[:count], non_blocking=pinned)
        if self._copied is not None:
            self._copied.record()


def steered_offsets(positions: str, token_positions: np.ndarray, num_prompt_tokens: int) -> np.ndarray:
    """Which of a request's tokens in this forward its rule steers (offsets into its slice), by the
    rule of steering/plan.py; ``token_positions`` are the tokens' absolute positions."""
    if positions == "all":
        return np.arange(len(token_positions))
    keep = steered_position_mask(Positions(positions), torch.from_numpy(token_positions), num_prompt_tokens)
    return np.flatnonzero(keep.numpy())


class WorkerSteering:
    """The vector sets a worker holds and what it writes into the model's buffers around each forward."""

    def __init__(
        self,
        buffers: SteeringBuffers,
        owned_layers: Iterable[int],
        batch_rows: Callable[[], list[BatchRow]],
        captures: WorkerCaptures,
    ) -> None:
        self._buffers = buffers
        self.owned_layers = tuple(owned_layers)
        self._batch_rows = batch_rows  # this forward's requests
        self.captures = captures
        self.loops = WorkerLoops()
        self._slots = SlotTable(buffers.num_slots)
        self._edit_slots = SlotTable(buffers.num_slots)  # the edit table's (ablate, cap), by set key
        self._staging = TokenStaging(buffers.max_tokens, buffers.tables.device)
        self._sets: dict[str, Vectors] = {}
        self._combined: dict[SteeringRef, Vectors] = {}
        self._dirty = 0  # tokens at the head of the token buffers that may hold non-zero entries
        self.steered_rows = 0  # tokens steered since start (tests read it to see steering run)
        self.missing_sets = 0  # requests that named a set this worker did not hold
        self.unslotted = 0  # additions left out of a forward for want of a free slot

    @property
    def num_layers(self) -> int:
        return int(self._buffers.tables.shape[0])

    @property
    def held_sets(self) -> list[str]:
        return sorted(self._sets)

    def load(self, key: str, vectors: dict[int, bytes]) -> None:
        """Hold a vector set (float32 bytes) under ``key``, in float32 on the model's device."""
        device = self._buffers.tables.device
        self._sets[key] = {
            int(layer): torch.from_numpy(unpack(vector, np.float32)).to(device)
            for layer, vector in vectors.items()
            if int(layer) in self.owned_layers
        }
        self._combined.clear()

    def drop(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._sets.pop(key, None)
            self._slots.forget(("set", key))
            self._edit_slots.forget(key)
        self._combined.clear()

    # --- around each forward ------------------------------------------------------------------------

    def before_forward(self) -> StepReads:
        """Write this forward's slots, scales and read rows into the buffers; what it reads."""
        rows = self._batch_rows()
        count = rows[-1].end if rows else 0
        reads = StepReads()
        additions: list[Addition] = []
        edits: list[tuple[np.ndarray, str]] = []  # (flat tokens, edit set key)
        loop_reads: list[LoopRead] = []
        read_row = np.zeros(count, dtype=np.int64)
        for row in rows:
            if row.end <= row.start:
                continue
            additions += self._row_additions(row, loop_reads)
            edits += self._row_edits(row)
            if row.capture is not None:
                self._add_capture(row, row.capture, reads, read_row)
        # A loop's reading shares the read row of an in-flight capture at the same token.
        reads.loops = [(read, self._read_row_of(read.token, reads, read_row)) for read in loop_reads]
        if not additions and not edits and not reads and not self._dirty:
            return reads  # the buffers hold zeros already: nothing to write
        if count > self._buffers.max_tokens:
            raise RuntimeError(f"a forward of {count} tokens, past the buffers' {self._buffers.max_tokens}")
        slot, scale, read, edit = self._staging.arrays(count)
        self._place(additions, slot, scale)
        self._place_edits(edits, edit)
        read[:] = read_row
        self._write(count, bool(slot.any() or read.any() or edit.any()))
        self.captures.begin(reads.captures)
        return reads

    def after_forward(self, reads: StepReads) -> None:
        """Take this forward's reads out of the buffers and hand them to their captures and loops."""
        if not reads:
            return
        buffer = self._buffers.reads
        taken = buffer[:, : reads.rows + 1].double().cpu().numpy()
        buffer[:, 1 : reads.rows + 1].zero_()
        self._buffers.token_read[: self._dirty].zero_()  # a dummy forward before the next sums nothing
        for capture in reads.captures:
            self.captures.record(capture, taken, list(self.owned_layers))
        for read, row in reads.loops:
            read.observe(taken[: read.state.loop.spec.num_blocks, row])

    # --- what each request adds and reads --------------------------------------------------------------

    def _row_additions(self, row: BatchRow, loop_reads: list[LoopRead]) -> list[Addition]:
        vectors = self._held_vectors(row.ref)
        if row.loop is not None:
            return self._loop_additions(row, row.loop, vectors, loop_reads)
        if row.ref is None or vectors is None:
            return []
        offsets = steered_offsets(row.ref.positions, row.positions, row.num_prompt_tokens)
        if not offsets.size:
            return []
        key, scale = slot_key(row.ref)
        return [Addition(offsets + row.start, key, functools.partial(self._slot_vectors, row.ref), scale)]

    def _row_edits(self, row: BatchRow) -> list[tuple[np.ndarray, str]]:
        """The request's edit (ablate, cap) at its steered tokens, where the worker holds its set."""
        ref = row.ref
        if ref is None or ref.edit is None or row.loop is not None:
            return []
        if ref.edit not in self._sets:
            self.missing_sets += 1
            logger.error("a request names an edit set this worker does not hold; not edited")
            return []
        offsets = steered_offsets(ref.positions, row.positions, row.num_prompt_tokens)
        return [(offsets + row.start, ref.edit)] if offsets.size else []

    def _loop_additions(
        self, row: BatchRow, loop: LoopState, vectors: Vectors | None, loop_reads: list[LoopRead]
    ) -> list[Addition]:
        """A closed loop's parts (its slots are its own), and its reading when this forward owes one."""
        positions = row.positions
        read = loop_read(loop, vectors, positions, row.num_prompt_tokens, row.end - 1)
        if read is not None:
            loop_reads.append(read)
        plan = (vectors, row.ref.positions) if vectors is not None and row.ref is not None else None
        parts = loop_parts(loop, plan, positions, row.num_prompt_tokens)
        return [_loop_addition(loop.ref.token, row.start, part) for part in parts]

    def _add_capture(self, row: BatchRow, spec: CaptureSpec, reads: StepReads, read_row: np.ndarray) -> None:
        """A capture's tokens in this forward: the last prompt token and every in-flight position get a
        read row of their own, the other positions from ``spec.start`` on one summing row."""
        positions = row.positions
        summed = np.flatnonzero(positions >= spec.start)
        last = np.flatnonzero(positions == row.num_prompt_tokens - 1)
        kept = summed if spec.in_flight else last
        if reads.rows + len(kept) + 1 > self._buffers.num_read_rows:
            if spec.in_flight:  # no rows for its positions: the front end reads the answer back
                self.captures.spoil(spec.token)
                return
            raise RuntimeError("a forward's read-backs need more read rows than the buffers hold")
        kept_rows = []
        for offset in kept:
            reads.rows += 1
            read_row[row.start + offset] = reads.rows
            kept_rows.append((reads.rows, int(positions[offset])))
        rest = np.setdiff1d(summed, kept)
        sum_row = None
        if rest.size:
            reads.rows += 1
            sum_row = reads.rows
            read_row[row.start + rest] = sum_row
        last_position = row.num_prompt_tokens - 1 if last.size else None
        reads.captures.append(
            StepCapture(
                token=spec.token,
                num_blocks=spec.num_blocks,
                start=spec.start,
                sum_row=sum_row,
                sum_count=int(rest.size),
                kept=tuple(kept_rows),
                last_position=last_position,
                in_flight=spec.in_flight,
            )
        )

    def _read_row_of(self, token: int, reads: StepReads, read_row: np.ndarray) -> int:
        """The read row of one flat token, given it if it has none (a loop's reading)."""
        if read_row[token]:
            return int(read_row[token])
        if reads.rows + 1 > self._buffers.num_read_rows:
            raise RuntimeError("a forward's readings need more read rows than the buffers hold")
        reads.rows += 1
        read_row[token] = reads.rows
        return reads.rows

    # --- slots and buffers -------------------------------------------------------------------------------

    def _place(self, additions: list[Addition], slot: np.ndarray, scale: np.ndarray) -> None:
        """Give every addition a slot (written when new to it, or fresh) and mark its tokens."""
        placed = self._slots.assign([addition.key for addition in additions])
        for addition in additions:
            index, new = placed.get(addition.key, (None, False))
            if index is None:
                self.unslotted += 1
                logger.error("a forward carries more steering plans than the %d slots", self._slots.size)
                continue
            if new or addition.fresh:
                self._fill_slot(index, addition.vectors())
            slot[addition.tokens] = index
            scale[addition.tokens] = addition.scale
            self.steered_rows += int(addition.tokens.size)

    def _place_edits(self, edits: list[tuple[np.ndarray, str]], edit: np.ndarray) -> None:
        """Give every edit set a slot of the edit table (written when new to it); mark its tokens."""
        placed = self._edit_slots.assign([key for _, key in edits])
        for tokens, key in edits:
            index, new = placed.get(key, (None, False))
            if index is None:
                self.unslotted += 1
                logger.error("a forward carries more edits than the %d slots", self._edit_slots.size)
                continue
            if new:
                units, params = self._buffers.edit_units, self._buffers.edit_params
                units[:, index].zero_()
                params[:, index].zero_()
                for layer, packed in self._sets[key].items():
                    units[layer, index].copy_(packed[:-3])  # the unit direction, then alpha, low, high
                    params[layer, index].copy_(packed[-3:])
            edit[tokens] = index
            self.steered_rows += int(tokens.size)

    def _fill_slot(self, index: int, vectors: Vectors) -> None:
        tables = self._buffers.tables
        tables[:, index].zero_()
        for layer, vector in vectors.items():
            tables[layer, index].copy_(vector)

    def _write(self, count: int, any_set: bool) -> None:
        """The staged token arrays into the buffers; past them, up to what the forward before wrote,
        zeros (CUDA graphs pad a batch, and padding must read slot 0 and the discard row)."""
        buffers = self._buffers
        self._staging.copy_to(buffers, count)
        if self._dirty > count:
            buffers.token_slot[count : self._dirty].zero_()
            buffers.token_scale[count : self._dirty].zero_()
            buffers.token_read[count : self._dirty].zero_()
            buffers.token_edit[count : self._dirty].zero_()
        self._dirty = count if any_set else 0

    # --- vector sets -------------------------------------------------------------------------------------

    def _slot_vectors(self, ref: SteeringRef) -> Vectors:
        """What a plan's slot holds: one persona's unit vectors (its strength is the scale), or a
        composition's sum of strength * vectors."""
        if len(ref.terms) == 1:
            return self._sets[ref.terms[0][0]]
        return self._vectors_of(ref) or {}

    def _vectors_of(self, ref: SteeringRef) -> Vectors | None:
        """layer -> sum of strength * vector over the ref's terms, float32 (memoized until the sets
        change); None when a set is not held."""
        combined = self._combined.get(ref)
        if combined is not None:
            return combined
        if any(key not in self._sets for key, _ in ref.terms):
            return None
        summed: Vectors = {}
        for key, strength in ref.terms:
            for layer, vector in self._sets[key].items():
                scaled = vector * strength
                summed[layer] = summed[layer] + scaled if layer in summed else scaled
        self._combined[ref] = summed
        return summed

    def _held_vectors(self, ref: SteeringRef | None) -> Vectors | None:
        if ref is None:
            return None
        vectors = self._vectors_of(ref)
        if vectors is None:
            self.missing_sets += 1
            logger.error("a request names a persona vector set this worker does not hold; unsteered")
        return vectors


def _loop_addition(token: str, start: int, part: LoopPart) -> Addition:
    """A part of a closed loop as an addition of the flat batch, in a slot of the loop's own."""
    vectors = part.vectors
    return Addition(part.offsets + start, ("loop", token, part.name), lambda: vectors, fresh=part.fresh)
