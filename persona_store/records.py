"""Persona records: one persona's vectors for one target model, with their metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persona_store.arrays import float32_by_layer

PERSONA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(PERSONA_NAME_PATTERN)


def is_valid_persona_name(name: str) -> bool:
    return bool(_NAME.match(name))


@dataclass(frozen=True)
class PersonaInfo:
    """Everything about a stored persona except its vectors."""

    model: str
    name: str
    layers: tuple[int, ...]
    hidden_size: int
    default_strength: float
    description: str
    provenance: dict[str, Any]
    version: int
    created_at: float
    checksum: str
    default_positions: str = "all"  # all | prompt | response: where the persona steers unless asked otherwise

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "layers": list(self.layers),
            "hidden_size": self.hidden_size,
            "default_strength": self.default_strength,
            "default_positions": self.default_positions,
            "description": self.description,
            "provenance": self.provenance,
            "version": self.version,
            "created_at": self.created_at,
            "checksum": self.checksum,
        }


@dataclass(frozen=True)
class PersonaDraft:
    """A persona to write: the store assigns its version, creation time and checksum."""

    model: str
    name: str
    vectors: dict[int, np.ndarray]
    default_strength: float = 1.0
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=lambda: {"kind": "uploaded"})
    default_positions: str = "all"

    def __post_init__(self) -> None:
        vectors = float32_by_layer(
            self.vectors,
            ndim=1,
            empty="a persona needs at least one layer vector",
            mismatch="all vectors of a persona are 1-D and of one size",
        )
        object.__setattr__(self, "vectors", vectors)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


@dataclass(frozen=True)
class PersonaRecord:
    info: PersonaInfo
    vectors: dict[int, np.ndarray]
