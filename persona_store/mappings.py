"""Mapping records: the linear maps that carry a persona from a source model to a target model.

A mapping holds one matrix per source block, ``W[l]`` of shape (source hidden, target hidden), so
that ``v_target = v_source @ W[l]`` steers block ``layer_map[l]`` of the target. The matrices are
large (3584 x 4096 float32 is 58 MB), so listing never reads them.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persona_store.arrays import float32_by_layer, matrices_checksum

MAPPING_ID_PATTERN = r"^map-[0-9a-f]{12}$"
_MAPPING_ID = re.compile(MAPPING_ID_PATTERN)


def new_mapping_id() -> str:
    return f"map-{uuid.uuid4().hex[:12]}"


def is_valid_mapping_id(mapping_id: str) -> bool:
    return bool(_MAPPING_ID.fullmatch(mapping_id))  # match's $ takes a trailing newline


@dataclass(frozen=True)
class MappingDraft:
    """A mapping to write: the store assigns its id, creation time and checksum."""

    source_model: str
    target_model: str
    matrices: dict[int, np.ndarray]  # source block -> (source hidden, target hidden)
    layer_map: dict[int, int]  # source block -> target block
    metadata: dict[str, Any] = field(default_factory=dict)  # method, lambda, R^2, norms: JSON only

    def __post_init__(self) -> None:
        matrices = float32_by_layer(
            self.matrices,
            ndim=2,
            empty="a mapping needs at least one matrix",
            mismatch="all matrices of a mapping are 2-D and of one shape",
        )
        layer_map = {int(k): int(v) for k, v in self.layer_map.items()}
        if set(layer_map) != set(matrices):
            raise ValueError("the layer map names exactly the source blocks that have a matrix")
        object.__setattr__(self, "matrices", matrices)
        object.__setattr__(self, "layer_map", dict(sorted(layer_map.items())))

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = next(iter(self.matrices.values())).shape
        return int(rows), int(cols)


@dataclass(frozen=True)
class MappingInfo:
    """Everything about a stored mapping except its matrices."""

    id: str
    source_model: str
    target_model: str
    layer_map: dict[int, int]
    source_hidden_size: int
    target_hidden_size: int
    metadata: dict[str, Any]
    created_at: float
    checksum: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source_model": self.source_model,
            "target_model": self.target_model,
            "layers": {str(k): v for k, v in self.layer_map.items()},
            "source_hidden_size": self.source_hidden_size,
            "target_hidden_size": self.target_hidden_size,
            "metadata": self.metadata,
            "created_at": self.created_at,
            "checksum": self.checksum,
        }


@dataclass(frozen=True)
class MappingRecord:
    info: MappingInfo
    matrices: dict[int, np.ndarray]


def mapping_info(mapping_id: str, draft: MappingDraft, created_at: float) -> MappingInfo:
    rows, cols = draft.shape
    return MappingInfo(
        id=mapping_id,
        source_model=draft.source_model,
        target_model=draft.target_model,
        layer_map=draft.layer_map,
        source_hidden_size=rows,
        target_hidden_size=cols,
        metadata=draft.metadata,
        created_at=created_at,
        checksum=matrices_checksum(draft.matrices),
    )
