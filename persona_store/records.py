"""Persona records: one persona's vectors for one target model, with their metadata."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERSONA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(PERSONA_NAME_PATTERN)


def is_valid_persona_name(name: str) -> bool:
    return bool(_NAME.match(name))


def vectors_checksum(vectors: dict[int, np.ndarray]) -> str:
    """sha256 over the float32 bytes of the vectors in layer order, prefixed with their layers."""
    digest = hashlib.sha256()
    for layer in sorted(vectors):
        digest.update(int(layer).to_bytes(4, "little"))
        digest.update(np.ascontiguousarray(vectors[layer], dtype=np.float32).tobytes())
    return digest.hexdigest()


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
        vectors = {int(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in self.vectors.items()}
        if not vectors:
            raise ValueError("a persona needs at least one layer vector")
        sizes = {v.shape for v in vectors.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError("all vectors of a persona are 1-D and of one size")
        object.__setattr__(self, "vectors", dict(sorted(vectors.items())))

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


@dataclass(frozen=True)
class PersonaRecord:
    info: PersonaInfo
    vectors: dict[int, np.ndarray]
