"""Steering operators beyond addition: edits of a block's output that depend on the output itself.

A persona term is applied one of three ways at each of its blocks (docs/design.md, "Steering
operators"):

- ``add`` (the default): ``h + strength * v``, the same for every token;
- ``ablate``: ``h - alpha (h . u) u`` with ``u`` the unit direction of ``v``: the projection on the
  persona is removed (``alpha`` = 1, the term's strength when given);
- ``cap``: the projection ``h . u`` clamped into ``[min, max]`` (either bound may be open): only the
  excess is removed, so a token whose reading stays within the range is left bit for bit.

Both edits are one formula, so that every engine carries one kind of per-token edit: the projection
``p = h . u`` becomes ``clamp((1 - alpha) p, low, high)``, that is ``h + (clamp((1 - alpha) p, low,
high) - p) u``; ablate is ``(alpha, -inf, +inf)``, cap is ``(0, min, max)``. At a block, a plan's
additions apply first, then its edits in the order the request gave them, so "pirate added, then
pirate capped" caps what the addition pushed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from server.steering.errors import SteeringError


class Operator(StrEnum):
    ADD = "add"
    ABLATE = "ablate"
    CAP = "cap"


@dataclass(frozen=True)
class BlockEdit:
    """One edit of a block's output along the unit direction ``unit`` (float32 [hidden])."""

    unit: torch.Tensor
    alpha: float = 0.0
    low: float = -math.inf
    high: float = math.inf

    @classmethod
    def along(cls, vector: torch.Tensor, alpha: float, low: float, high: float) -> BlockEdit:
        norm = float(torch.linalg.vector_norm(vector.float()))
        if norm == 0:
            raise SteeringError("an ablate or cap needs a non-zero persona vector at each of its blocks")
        return cls((vector.float() / norm).contiguous(), float(alpha), float(low), float(high))

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [..., hidden] edited; the arithmetic in float32, the result in its dtype."""
        return apply_edit(hidden, self.unit, self.alpha, self.low, self.high)

    def digest(self, into: hashlib._Hash) -> None:  # type: ignore[name-defined]
        into.update(self.unit.numpy().tobytes())
        for value in (self.alpha, self.low, self.high):
            into.update(repr(value).encode())


def edit_bounds(
    operator: Operator, strength: float | None, low: float | None, high: float | None
) -> tuple[float, float, float]:
    """(alpha, low, high) of an ablate or cap term, as the module docstring writes them."""
    if operator is Operator.ABLATE:
        return (1.0 if strength is None else float(strength)), -math.inf, math.inf
    if operator is Operator.CAP:
        if low is None and high is None:
            raise SteeringError("a cap needs max, min or both")
        lower, upper = -math.inf if low is None else float(low), math.inf if high is None else float(high)
        if lower > upper:
            raise SteeringError(f"a cap's min ({lower:g}) is above its max ({upper:g})")
        return 0.0, lower, upper
    raise SteeringError(f"operator '{operator}' is no edit")


def apply_edit(
    hidden: torch.Tensor,
    unit: torch.Tensor,
    alpha: torch.Tensor | float,
    low: torch.Tensor | float,
    high: torch.Tensor | float,
) -> torch.Tensor:
    """The edit on ``hidden`` [..., hidden] along ``unit`` (broadcast against it); ``alpha``, ``low``
    and ``high`` are scalars or tensors shaped as ``hidden`` without its last dimension. A token
    whose projection the edit leaves as it is gets exactly zero added (the tokens a cap does not
    reach stay bit for bit)."""
    stream = hidden.float()
    projection = (stream * unit).sum(dim=-1)
    edited = torch.clamp((1 - alpha) * projection, low, high)  # type: ignore[call-overload]
    change = torch.where(edited == projection, torch.zeros_like(projection), edited - projection)
    return (stream + change.unsqueeze(-1) * unit).to(hidden.dtype) if bool(change.any()) else hidden
