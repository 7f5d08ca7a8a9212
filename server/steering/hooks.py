"""Forward hooks that add per-row steering vectors to decoder block outputs.

The hooks are installed once per model and do nothing unless a ``BatchSteering`` is active for the
forward pass being run. A ``BatchSteering`` describes one batched forward: for each steered layer,
which rows get which vector at which of the forward's token positions. Rows it does not name are
left untouched, bit for bit, because the addition goes through ``index_add`` on the steered rows only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from server.steering.layers import DecoderLayout
from server.steering.plan import SteeringPlan


@dataclass(frozen=True)
class LayerAddition:
    """What one decoder block adds to its output in one forward pass."""

    rows: torch.Tensor | None  # long [n]: batch rows steered at this layer; None: every row, in order
    addition: torch.Tensor  # [n, tokens, hidden]: strength * vector where a row is steered, else 0

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return hidden + self.addition
        return hidden.index_add(0, self.rows, self.addition)

    def dense(self, num_rows: int) -> torch.Tensor:
        """The addition of every row [num_rows, tokens, hidden] (zeros where a row is not steered)."""
        if self.rows is None:
            return self.addition
        zeros = self.addition.new_zeros((num_rows, *self.addition.shape[1:]))
        return zeros.index_add(0, self.rows, self.addition)


@dataclass(frozen=True)
class BatchSteering:
    """Steering of one batched forward pass, keyed by decoder block index."""

    layers: dict[int, LayerAddition]

    @classmethod
    def build(
        cls,
        plans: Sequence[SteeringPlan | None],
        position_masks: torch.Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> BatchSteering | None:
        """``position_masks`` is bool [rows, tokens]: where each row's plan applies in this forward."""
        deltas = [None if plan is None else plan.deltas for plan in plans]
        return cls.from_deltas(deltas, position_masks, dtype=dtype, device=device)

    @classmethod
    def from_deltas(
        cls,
        rows_deltas: Sequence[Mapping[int, torch.Tensor] | None],
        position_masks: torch.Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> BatchSteering | None:
        """Per row, block -> what it adds (None or empty: nothing); ``position_masks`` as in ``build``."""
        per_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for row, deltas in enumerate(rows_deltas):
            if not deltas or not bool(position_masks[row].any()):
                continue
            for layer, delta in deltas.items():
                per_layer.setdefault(layer, []).append((row, delta))
        if not per_layer:
            return None
        layers: dict[int, LayerAddition] = {}
        for layer, entries in per_layer.items():
            rows = torch.tensor([row for row, _ in entries], dtype=torch.long)
            vectors = torch.stack([delta for _, delta in entries])
            # Precomputed once per batch composition: a decode step reuses it at every token.
            addition = position_masks[rows].to(vectors.dtype).unsqueeze(-1) * vectors.unsqueeze(1)
            every_row = len(entries) == len(rows_deltas)
            layers[layer] = LayerAddition(
                rows=None if every_row else rows.to(device),
                addition=addition.to(device=device, dtype=dtype),
            )
        return cls(layers=layers)


def summed(parts: Sequence[BatchSteering | None], num_rows: int) -> BatchSteering | None:
    """One forward's steering that adds what each of ``parts`` adds (over the same rows and tokens)."""
    present = [part for part in parts if part is not None]
    if len(present) < 2:
        return present[0] if present else None
    layers: dict[int, LayerAddition] = {}
    for layer in sorted({layer for part in present for layer in part.layers}):
        additions = [part.layers[layer].dense(num_rows) for part in present if layer in part.layers]
        layers[layer] = LayerAddition(rows=None, addition=torch.stack(additions).sum(dim=0))
    return BatchSteering(layers=layers)


class SteeringHooks:
    """Owns one forward hook per decoder block of a model; steering applies only inside ``active``."""

    def __init__(self, layout: DecoderLayout) -> None:
        self.layout = layout
        self._current: BatchSteering | None = None
        self._handles: list[RemovableHandle] = [
            block.register_forward_hook(self._make_hook(index)) for index, block in enumerate(layout.blocks)
        ]

    def _make_hook(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
            steering = self._current
            addition = steering.layers.get(layer) if steering is not None else None
            if addition is None:
                return None
            # transformers >= 5 blocks return the hidden states; older ones a tuple led by them.
            if isinstance(output, torch.Tensor):
                return addition.apply(output)
            return (addition.apply(output[0]), *output[1:])

        return hook

    @contextmanager
    def active(self, steering: BatchSteering | None) -> Iterator[None]:
        """Apply ``steering`` to forward passes run inside this block (one thread drives a model)."""
        self._current = steering
        try:
            yield
        finally:
            self._current = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
