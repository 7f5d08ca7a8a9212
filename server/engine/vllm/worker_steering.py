"""Steering inside a vLLM worker: vector sets held by key, one delta table per forward, block hooks.

A forward pass of vLLM's V1 model runner carries the tokens of many requests in one flat tensor;
the tokens ``query_start_loc[i]:query_start_loc[i + 1]`` belong to the runner's i-th request, in
steps that mix prefill and decode too. At the first hooked block of a forward, the rows each request
steers and what they add are worked out once (``StepDeltas``); every hooked block then adds its rows.

vLLM's Llama-family blocks return ``(hidden, residual)`` and the residual stream after the block is
their sum (the next block's fused add + norm adds them), so adding to ``hidden`` is adding to the HF
block output.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from server.engine.vllm.capture import StepCapture, WorkerCaptures
from server.engine.vllm.wire import CaptureSpec, SteeringRef, unpack
from server.engine.vllm.worker_loops import LoopRead, LoopState, WorkerLoops, loop_additions, loop_read
from server.steering.plan import Positions, steered_position_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRow:
    """One request's tokens in the flat batch of a forward."""

    start: int
    end: int
    num_prompt_tokens: int
    ref: SteeringRef | None
    capture: CaptureSpec | None = None
    loop: LoopState | None = None


@dataclass
class StepDeltas:
    """Per steered block: the flat rows to add to and what each row adds."""

    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> long [n]
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, hidden]
    captures: list[StepCapture] = field(default_factory=list)  # read-backs in this forward
    capture_rows: torch.Tensor | None = None  # their rows, concatenated
    reads: list[LoopRead] = field(default_factory=list)  # closed loops read in this forward


def steered_offsets(positions: str, token_positions: torch.Tensor, num_prompt_tokens: int) -> torch.Tensor:
    """Which of a request's tokens in this forward its rule steers (offsets into its slice), by the
    rule of steering/plan.py; ``token_positions`` are the tokens' absolute positions."""
    keep = steered_position_mask(Positions(positions), token_positions, num_prompt_tokens)
    return torch.nonzero(keep, as_tuple=False).flatten()


class WorkerSteering:
    """The vector sets a worker holds and the hooks that apply them to its blocks."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        owned_layers: Iterable[int],
        batch_rows: Callable[[], list[BatchRow] | None],
        current_forward: Callable[[], object | None],
        captures: WorkerCaptures,
    ) -> None:
        self._blocks = blocks
        self.owned_layers = tuple(owned_layers)
        self._batch_rows = batch_rows  # this forward's requests, None in a dummy or profiling run
        self._current_forward = current_forward  # identity of the forward under way
        self.captures = captures
        self.loops = WorkerLoops()
        self._sets: dict[str, dict[int, torch.Tensor]] = {}
        self._combined: dict[SteeringRef, dict[int, torch.Tensor]] = {}
        self._forward: object | None = None
        self._step = StepDeltas()
        self._handles: list[Any] = []
        self.steered_rows = 0  # rows steered since start (tests read it to see the hooks fire)
        self.missing_sets = 0  # requests that named a set this worker did not hold

    @functools.cached_property  # the blocks' weights stay where they were loaded
    def _device(self) -> torch.device:
        weight = next(self._blocks[self.owned_layers[0]].parameters()) if self.owned_layers else None
        return weight.device if weight is not None else torch.device("cpu")

    @functools.cached_property
    def _dtype(self) -> torch.dtype:
        """The dtype added vectors take: the blocks' (float32 beside quantized weights)."""
        weight = next(self._blocks[self.owned_layers[0]].parameters()) if self.owned_layers else None
        return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32

    @property
    def held_sets(self) -> list[str]:
        return sorted(self._sets)

    def load(self, key: str, vectors: dict[int, bytes]) -> None:
        """Hold a vector set (float32 bytes, kept in the model's dtype on its device) under ``key``."""
        self._sets[key] = {
            int(layer): torch.from_numpy(unpack(vector, np.float32)).to(
                device=self._device, dtype=self._dtype
            )
            for layer, vector in vectors.items()
            if int(layer) in self.owned_layers
        }
        self._combined.clear()

    def drop(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._sets.pop(key, None)
        self._combined.clear()

    def install(self) -> None:
        for layer in self.owned_layers:
            hook = self._hook_for(layer)
            self._handles.append(self._blocks[layer].register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            step = self._deltas_for_this_forward(args, kwargs)
            rows = step.rows.get(layer)
            if rows is not None:
                if isinstance(output, tuple):
                    output = (output[0].index_add(0, rows, step.deltas[layer]), *output[1:])
                else:
                    output = output.index_add(0, rows, step.deltas[layer])
            if step.captures or step.reads:
                stream = output[0] + output[1] if isinstance(output, tuple) else output
                if step.capture_rows is not None:
                    self.captures.record(layer, stream, step.captures, step.capture_rows)
                for read in step.reads:
                    read.take(layer, stream)
            return output

        return hook

    def _deltas_for_this_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepDeltas:
        forward = self._current_forward()
        if forward is not None and forward is self._forward:
            return self._step
        self._forward = forward
        rows = self._batch_rows() if forward is not None else None
        positions = kwargs.get("positions", args[0] if args else None)
        self._step = self._build(rows or [], positions)
        return self._step

    def _vectors_of(self, ref: SteeringRef) -> dict[int, torch.Tensor] | None:
        """layer -> sum of strength * vector over the ref's terms (memoized until the sets change)."""
        combined = self._combined.get(ref)
        if combined is not None:
            return combined
        if any(key not in self._sets for key, _ in ref.terms):
            return None
        summed: dict[int, torch.Tensor] = {}
        for key, strength in ref.terms:
            for layer, vector in self._sets[key].items():
                scaled = vector.float() * strength
                summed[layer] = summed[layer] + scaled if layer in summed else scaled
        dtype = next(iter(self._sets[ref.terms[0][0]].values()), torch.zeros(0)).dtype
        combined = {layer: vector.to(dtype) for layer, vector in summed.items()}
        self._combined[ref] = combined
        return combined

    def _held_vectors(self, ref: SteeringRef | None) -> dict[int, torch.Tensor] | None:
        if ref is None:
            return None
        vectors = self._vectors_of(ref)
        if vectors is None:
            self.missing_sets += 1
            logger.error("a request names a persona vector set this worker does not hold; unsteered")
        return vectors

    def _row_additions(
        self, row: BatchRow, token_positions: Callable[[BatchRow], torch.Tensor], step: StepDeltas
    ) -> list[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        """(offsets into the row's tokens, block -> vector) pairs the request adds in this forward; a
        closed loop's reading joins ``step`` when the forward chooses its next token."""
        vectors = self._held_vectors(row.ref)
        if row.loop is not None:
            positions = token_positions(row)
            read = loop_read(row.loop, vectors, positions, row.num_prompt_tokens, row.end - 1)
            if read is not None:
                step.reads.append(read)
            plan = (vectors, row.ref.positions) if vectors is not None and row.ref is not None else None
            like = torch.empty(0, device=self._device, dtype=self._dtype)
            return loop_additions(row.loop, plan, positions, row.num_prompt_tokens, like)
        if row.ref is None or vectors is None:
            return []
        if row.ref.positions == "all":
            offsets = torch.arange(row.end - row.start)
        else:
            offsets = steered_offsets(row.ref.positions, token_positions(row), row.num_prompt_tokens)
        return [(offsets, vectors)] if offsets.numel() else []

    def _build(self, batch: list[BatchRow], positions: torch.Tensor | None) -> StepDeltas:
        per_layer_rows: dict[int, list[torch.Tensor]] = {}
        per_layer_deltas: dict[int, list[torch.Tensor]] = {}
        flat: list[torch.Tensor] = []

        def token_positions(row: BatchRow) -> torch.Tensor:
            if not flat:  # one device->host copy per forward, only when a rule needs positions
                assert positions is not None
                flat.append((positions[0] if positions.ndim == 2 else positions).cpu())
            return flat[0][row.start : row.end]

        step = StepDeltas()
        for row in batch:
            if row.end <= row.start or positions is None:
                continue
            if row.capture is not None:
                step.captures.append(_step_capture(row, row.capture, token_positions(row)))
            for offsets, by_layer in self._row_additions(row, token_positions, step):
                for layer, vector in by_layer.items():
                    per_layer_rows.setdefault(layer, []).append(offsets + row.start)
                    per_layer_deltas.setdefault(layer, []).append(vector.expand(offsets.numel(), -1))
        if step.captures:
            step.capture_rows = self.captures.begin(step.captures)
        for layer, parts in per_layer_rows.items():
            device = per_layer_deltas[layer][0].device
            step.rows[layer] = torch.cat(parts).to(device)
            step.deltas[layer] = torch.cat(per_layer_deltas[layer])
            self.steered_rows += int(step.rows[layer].numel())
        return step


def _step_capture(row: BatchRow, spec: CaptureSpec, token_positions: torch.Tensor) -> StepCapture:
    """A read-back's rows in this forward: positions from ``spec.start`` on are summed, and the last
    prompt token's row is kept when this forward holds it (a long prompt is prefilled in chunks)."""
    keep = torch.nonzero(token_positions >= spec.start, as_tuple=False).flatten()
    at_last = torch.nonzero(token_positions == row.num_prompt_tokens - 1, as_tuple=False).flatten()
    last = row.start + int(at_last[0]) if at_last.numel() else None
    positions = tuple(token_positions[keep].tolist()) if spec.in_flight else None
    return StepCapture(spec.token, spec.num_blocks, keep + row.start, last, positions)
