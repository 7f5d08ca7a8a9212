"""Forward hooks that add per-row steering vectors to decoder block outputs.

The hooks are installed once per model and do nothing unless a ``BatchSteering`` is active for the
forward pass being run. A ``BatchSteering`` describes one batched forward: for each steered layer,
which rows get which vector at which of the forward's token positions. Rows it does not name are
left untouched, bit for bit, because the addition goes through ``index_add`` on the steered rows only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from server.steering.layers import DecoderLayout
from server.steering.operators import BlockEdit, apply_edit
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
class LayerEdit:
    """One round of edits at a block in one forward pass: the k-th edit of each row that has one
    there (``operators.py``), at the row's steered positions; other rows are not touched."""

    rows: torch.Tensor  # long [n]
    mask: torch.Tensor  # bool [n, tokens]: where each row's edit applies
    units: torch.Tensor  # float32 [n, 1, hidden]
    alpha: torch.Tensor  # float32 [n, 1]
    low: torch.Tensor  # float32 [n, 1]
    high: torch.Tensor  # float32 [n, 1]

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        chosen = hidden.index_select(0, self.rows)
        edited = apply_edit(chosen, self.units, self.alpha, self.low, self.high)
        if edited is chosen:  # nothing moved (a cap above every reading): leave the batch as it is
            return hidden
        change = torch.where(self.mask.unsqueeze(-1), edited - chosen, torch.zeros_like(chosen))
        return hidden.index_add(0, self.rows, change)

    @classmethod
    def of_rows(
        cls, entries: Sequence[tuple[int, torch.Tensor, BlockEdit]], device: torch.device | str
    ) -> LayerEdit:
        """``entries``: (row, position mask [tokens], edit) per edited row."""
        edits = [edit for _, _, edit in entries]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).unsqueeze(-1).to(device)

        return cls(
            rows=torch.tensor([row for row, _, _ in entries], dtype=torch.long, device=device),
            mask=torch.stack([mask for _, mask, _ in entries]).to(device),
            units=torch.stack([edit.unit for edit in edits]).unsqueeze(1).to(device),
            alpha=column([edit.alpha for edit in edits]),
            low=column([edit.low for edit in edits]),
            high=column([edit.high for edit in edits]),
        )


@dataclass(frozen=True)
class BatchSteering:
    """Steering of one batched forward pass, keyed by decoder block index: what each block adds,
    then the rounds of edits it applies."""

    layers: dict[int, LayerAddition]
    edits: dict[int, tuple[LayerEdit, ...]] = field(default_factory=dict)

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Block ``layer``'s output steered, or None where this pass leaves the block alone."""
        addition, edits = self.layers.get(layer), self.edits.get(layer, ())
        if addition is None and not edits:
            return None
        if addition is not None:
            hidden = addition.apply(hidden)
        for edit in edits:
            hidden = edit.apply(hidden)
        return hidden

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
        added = cls.from_deltas(deltas, position_masks, dtype=dtype, device=device)
        return with_edits(added, plans, position_masks, device)

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


def with_edits(
    steering: BatchSteering | None,
    plans: Sequence[SteeringPlan | None],
    position_masks: torch.Tensor,
    device: torch.device | str,
) -> BatchSteering | None:
    """``steering`` with the edits of ``plans`` (row i's at its ``position_masks[i]``) after it."""
    rounds: dict[int, list[list[tuple[int, torch.Tensor, BlockEdit]]]] = {}
    for row, plan in enumerate(plans):
        if plan is None or not plan.edits or not bool(position_masks[row].any()):
            continue
        for layer, listed in plan.edits.items():
            layer_rounds = rounds.setdefault(layer, [])
            for index, edit in enumerate(listed):
                if index == len(layer_rounds):
                    layer_rounds.append([])
                layer_rounds[index].append((row, position_masks[row], edit))
    if not rounds:
        return steering
    edits = {
        layer: tuple(LayerEdit.of_rows(entries, device) for entries in layer_rounds)
        for layer, layer_rounds in rounds.items()
    }
    return BatchSteering(layers=steering.layers if steering is not None else {}, edits=edits)


def summed(parts: Sequence[BatchSteering | None], num_rows: int) -> BatchSteering | None:
    """One forward's steering that adds what each of ``parts`` adds (over the same rows and tokens)."""
    present = [part for part in parts if part is not None]
    if len(present) < 2:
        return present[0] if present else None
    layers: dict[int, LayerAddition] = {}
    for layer in sorted({layer for part in present for layer in part.layers}):
        additions = [part.layers[layer].dense(num_rows) for part in present if layer in part.layers]
        layers[layer] = LayerAddition(rows=None, addition=torch.stack(additions).sum(dim=0))
    # Edits are not summed: at most one part carries them (the request's plan; the others are a
    # closed loop's or a rule's additions).
    edits = next((part.edits for part in present if part.edits), {})
    return BatchSteering(layers=layers, edits=edits)


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
            if steering is None:
                return None
            # transformers >= 5 blocks return the hidden states; older ones a tuple led by them.
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            steered = steering.apply(layer, hidden)
            if steered is None:
                return None
            return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])

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
