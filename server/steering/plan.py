"""A request's steering: which vector is added to which decoder block's output, how strongly, where.

Positions (the default is ``all``, as llama.cpp control vectors and repeng steer):
- ``all``: every token, prompt and response;
- ``prompt``: the prompt tokens only; generated tokens run unsteered (over a steered KV cache);
- ``response``: every position whose output predicts a response token, that is the last prompt
  token and each generated token fed back in, as in the reference code of Chen et al. (2025).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import numpy as np
import torch

from server.steering.errors import SteeringError
from server.steering.operators import BlockEdit


class Positions(StrEnum):
    ALL = "all"
    PROMPT = "prompt"
    RESPONSE = "response"


VectorLike = torch.Tensor | np.ndarray | Sequence[float]


def _as_vector(layer: int, vector: VectorLike) -> torch.Tensor:
    tensor = torch.as_tensor(
        np.asarray(vector, dtype=np.float32) if not isinstance(vector, torch.Tensor) else vector
    )
    tensor = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if tensor.ndim != 1:
        raise SteeringError(f"the vector for layer {layer} must be 1-D, got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise SteeringError(f"the vector for layer {layer} holds NaN or infinite values")
    return tensor


@dataclass(frozen=True)
class PlanTerm:
    """One persona of a plan as it was composed: its vectors (float32) and its strength.

    An engine that keeps vectors where the model runs (vLLM's workers) ships each term's vectors once,
    under ``key``, and sends a request only the keys and strengths.
    """

    vectors: Mapping[int, torch.Tensor]
    strength: float
    source: str = ""  # what the vectors are, e.g. a persona of a model (newer vectors replace older)

    @cached_property
    def key(self) -> str:
        """A digest of the vectors (not the strength): equal keys hold equal vectors."""
        digest = hashlib.blake2b(digest_size=12)
        for layer, vector in self.vectors.items():
            digest.update(int(layer).to_bytes(4, "little"))
            digest.update(vector.numpy().tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class EditTerm:
    """A persona of a composition applied by an edit (ablate or cap, ``operators.py``) instead of
    an addition: its vectors give the directions, ``alpha``, ``low``, ``high`` the edit."""

    vectors: Mapping[int, VectorLike]
    alpha: float = 0.0
    low: float = -math.inf
    high: float = math.inf


AddTerm = tuple[Mapping[int, VectorLike], float] | tuple[Mapping[int, VectorLike], float, str]


@dataclass(frozen=True)
class SteeringPlan:
    """For one request: layer -> float32 vector, a strength, and the positions steered.

    The engine adds ``strength * vectors[L]`` to the output of decoder block ``L``.
    """

    vectors: Mapping[int, torch.Tensor]
    strength: float = 1.0
    positions: Positions = Positions.ALL
    # The personas summed into ``vectors`` (set by ``compose``); a plan built directly is one term.
    terms: tuple[PlanTerm, ...] = field(default=(), repr=False, compare=False)
    # block -> the edits applied there after the additions, in the order given (``operators.py``).
    edits: Mapping[int, tuple[BlockEdit, ...]] = field(default_factory=dict)
    _deltas: dict[int, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength):
            raise SteeringError(f"strength must be a finite number, got {self.strength}")
        vectors: dict[int, torch.Tensor] = {}
        for layer, vector in self.vectors.items():
            if int(layer) != layer or layer < 0:
                raise SteeringError(f"layer indices are non-negative integers, got {layer!r}")
            vectors[int(layer)] = _as_vector(int(layer), vector)
        object.__setattr__(self, "vectors", dict(sorted(vectors.items())))
        object.__setattr__(self, "positions", Positions(self.positions))
        deltas = {
            layer: vector * self.strength for layer, vector in self.vectors.items() if self.strength != 0
        }
        object.__setattr__(self, "_deltas", deltas)
        object.__setattr__(self, "edits", {int(b): tuple(e) for b, e in sorted(self.edits.items()) if e})
        if not self.terms:
            object.__setattr__(self, "terms", (PlanTerm(self.vectors, float(self.strength)),))

    @classmethod
    def compose(
        cls, terms: Sequence[AddTerm | EditTerm], positions: Positions | str = Positions.ALL
    ) -> SteeringPlan:
        """Sum several personas: each term is (layer -> vector, strength[, source]), added, or an
        ``EditTerm``; the result has strength 1 and keeps the added terms. At a block, the additions
        apply before the edits, so an addition listed after an edit of the same block is refused."""
        summed: dict[int, torch.Tensor] = {}
        kept: list[PlanTerm] = []
        edits: dict[int, list[BlockEdit]] = {}
        for term in terms:
            if isinstance(term, EditTerm):
                for layer, vector in term.vectors.items():
                    edit = BlockEdit.along(_as_vector(layer, vector), term.alpha, term.low, term.high)
                    edits.setdefault(int(layer), []).append(edit)
                continue
            added = _added_term(term)
            if edited := sorted(set(added.vectors) & set(edits)):
                raise SteeringError(
                    f"an added persona is listed after an ablate or cap of block {edited[0]}: additions "
                    "apply first at a block, so list the added persona before the edit"
                )
            kept.append(added)
            for layer, vector in added.vectors.items():
                scaled = vector * added.strength
                if layer in summed:
                    if summed[layer].shape != scaled.shape:
                        raise SteeringError(f"composed vectors for layer {layer} differ in size")
                    summed[layer] = summed[layer] + scaled
                else:
                    summed[layer] = scaled
        return cls(
            vectors=summed,
            strength=1.0,
            positions=Positions(positions),
            terms=tuple(kept),
            edits={layer: tuple(listed) for layer, listed in edits.items()},
        )

    @property
    def deltas(self) -> dict[int, torch.Tensor]:
        """layer -> strength * vector (float32); empty when the plan changes nothing."""
        return self._deltas

    @property
    def is_noop(self) -> bool:
        return not self._deltas and not self.edits

    def validate_for(self, num_layers: int, hidden_size: int) -> None:
        """Raise SteeringError unless every layer and vector fits a model of this shape."""
        sized = [(layer, vector) for layer, vector in self.vectors.items()]
        sized += [(layer, edit.unit) for layer, listed in self.edits.items() for edit in listed]
        for layer, vector in sized:
            if layer >= num_layers:
                raise SteeringError(f"layer {layer} does not exist: the model has blocks 0..{num_layers - 1}")
            if vector.shape[0] != hidden_size:
                raise SteeringError(
                    f"the vector for layer {layer} has size {vector.shape[0]}, "
                    f"the model's hidden size is {hidden_size}"
                )

    def fingerprint(self) -> str:
        """A digest of what the plan adds where: equal fingerprints steer identically."""
        digest = hashlib.sha256(self.positions.value.encode())
        for layer, delta in self._deltas.items():
            digest.update(layer.to_bytes(4, "little"))
            digest.update(delta.numpy().tobytes())
        for layer, listed in self.edits.items():
            digest.update(b"edit" + layer.to_bytes(4, "little"))
            for edit in listed:
                edit.digest(digest)
        return digest.hexdigest()[:16]


def _added_term(term: AddTerm) -> PlanTerm:
    vectors, strength, *source = term
    if not math.isfinite(strength):
        raise SteeringError(f"strength must be a finite number, got {strength}")
    layer_vectors = {layer: _as_vector(layer, vector) for layer, vector in vectors.items()}
    return PlanTerm(layer_vectors, float(strength), source[0] if source else "")


def steered_position_mask(
    positions: Positions, token_positions: torch.Tensor, num_prompt_tokens: int
) -> torch.Tensor:
    """Which tokens, given their absolute positions, a plan steers (bool, one entry per token):
    positions before ``num_prompt_tokens`` are the prompt, the later ones generated tokens fed back."""
    if positions == Positions.ALL:
        return torch.ones_like(token_positions, dtype=torch.bool)
    if positions == Positions.PROMPT:
        return token_positions < num_prompt_tokens
    return token_positions >= num_prompt_tokens - 1  # the last prompt token and every generated one


def prompt_position_mask(positions: Positions, num_prompt_tokens: int) -> torch.Tensor:
    """Which prompt tokens a plan steers during prefill (bool, one entry per prompt token)."""
    return steered_position_mask(positions, torch.arange(num_prompt_tokens), num_prompt_tokens)


def steers_generated_tokens(positions: Positions) -> bool:
    """Whether a plan steers the positions of generated tokens fed back during decoding."""
    return positions in (Positions.ALL, Positions.RESPONSE)
