"""The stored form of personas and mappings, one encoding for the SQLite and the Redis store.

A persona version is a set of named fields (``PERSONA_FIELDS``; layers and provenance as JSON) plus
``vectors``: one float32 blob, the layer vectors as rows in layer order. A mapping is its named fields
(``MAPPING_FIELDS``; layer map and metadata as JSON) plus one float32 blob per source block. SQLite
keeps the fields as columns and Redis as hash fields, so the decoders read a field -> value mapping
and accept both what SQLite answers (str, int, float) and what Redis answers (bytes).

Databases written before this module read back unchanged: these are the same fields and bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from persona_store.arrays import vectors_checksum
from persona_store.mappings import MappingInfo
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord

PERSONA_FIELDS = (
    "model", "name", "version", "created_at", "hidden_size", "layers", "default_strength",
    "default_positions", "description", "provenance", "checksum",
)  # fmt: skip
MAPPING_FIELDS = (
    "id", "source_model", "target_model", "layer_map", "source_hidden_size", "target_hidden_size",
    "metadata", "created_at", "checksum",
)  # fmt: skip

Fields = Mapping[str, Any]


def text(value: Any) -> str:
    """A stored text field: Redis answers bytes, SQLite str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def persona_fields(draft: PersonaDraft, created_at: float) -> dict[str, Any]:
    """Every field of a new version but ``version``, which the store assigns when it writes.

    Floats stay floats: SQLite stores them as REAL, redis-py sends ``repr(value)``, which reads back
    exactly.
    """
    return {
        "model": draft.model,
        "name": draft.name,
        "created_at": created_at,
        "hidden_size": draft.hidden_size,
        "layers": json.dumps(list(draft.vectors)),
        "default_strength": float(draft.default_strength),
        "default_positions": draft.default_positions,
        "description": draft.description,
        "provenance": json.dumps(draft.provenance),
        "checksum": vectors_checksum(draft.vectors),
        "vectors": np.stack(list(draft.vectors.values())).astype(np.float32).tobytes(),
    }


def decode_persona_info(fields: Fields) -> PersonaInfo:
    return PersonaInfo(
        model=text(fields["model"]),
        name=text(fields["name"]),
        layers=tuple(json.loads(fields["layers"])),
        hidden_size=int(fields["hidden_size"]),
        default_strength=float(fields["default_strength"]),
        description=text(fields["description"]),
        provenance=json.loads(fields["provenance"]),
        version=int(fields["version"]),
        created_at=float(fields["created_at"]),
        checksum=text(fields["checksum"]),
        default_positions=text(fields["default_positions"]),
    )


def decode_persona_record(fields: Fields) -> PersonaRecord:
    """The info and the vectors, each layer's vector its own writable copy (blobs are read-only)."""
    info = decode_persona_info(fields)
    rows = np.frombuffer(fields["vectors"], dtype=np.float32).reshape(len(info.layers), info.hidden_size)
    return PersonaRecord(info=info, vectors={layer: rows[i].copy() for i, layer in enumerate(info.layers)})


def mapping_fields(info: MappingInfo) -> dict[str, Any]:
    """The mapping's named fields; its matrices are stored apart, one ``matrix_blob`` each."""
    return {
        "id": info.id,
        "source_model": info.source_model,
        "target_model": info.target_model,
        "layer_map": json.dumps(info.layer_map),
        "source_hidden_size": info.source_hidden_size,
        "target_hidden_size": info.target_hidden_size,
        "metadata": json.dumps(info.metadata),
        "created_at": info.created_at,
        "checksum": info.checksum,
    }


def decode_mapping_info(fields: Fields) -> MappingInfo:
    return MappingInfo(
        id=text(fields["id"]),
        source_model=text(fields["source_model"]),
        target_model=text(fields["target_model"]),
        layer_map={int(k): int(v) for k, v in json.loads(fields["layer_map"]).items()},
        source_hidden_size=int(fields["source_hidden_size"]),
        target_hidden_size=int(fields["target_hidden_size"]),
        metadata=json.loads(fields["metadata"]),
        created_at=float(fields["created_at"]),
        checksum=text(fields["checksum"]),
    )


def matrix_blob(matrix: np.ndarray) -> bytes:
    return np.ascontiguousarray(matrix, dtype=np.float32).tobytes()


def decode_matrices(info: MappingInfo, blobs: Iterable[tuple[int, bytes]]) -> dict[int, np.ndarray]:
    """(source block, blob) pairs as matrices in block order, read-only views of their blobs.

    Views, not copies: one matrix of a 7B -> 8B mapping is 58 MB.
    """
    shape = (info.source_hidden_size, info.target_hidden_size)
    matrices = {int(layer): np.frombuffer(blob, dtype=np.float32).reshape(shape) for layer, blob in blobs}
    return dict(sorted(matrices.items()))
