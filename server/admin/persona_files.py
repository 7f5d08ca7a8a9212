"""Persona vector files in and out of the store: safetensors, GGUF control vectors, persona_vectors .pt.

Imports go through PersonaAdmin.put, so an imported file is checked against the served model
(block range, hidden size, finite values) exactly like a JSON upload, and a file that fails any
check stores nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from persona_store.base import PersonaStore
from persona_store.formats import (
    FormatError,
    VectorFile,
    read_gguf_control_vector,
    read_persona_vectors_pt,
    read_safetensors,
    write_gguf_control_vector,
    write_persona_vectors_pt,
    write_safetensors,
)
from persona_store.records import PersonaInfo, PersonaRecord
from server.admin.persona_admin import PersonaAdmin
from server.serving.model_registry import ModelRegistry
from server.steering.layers import LLAMA_CPP_FIRST_STEERABLE_BLOCK, LLAMA_CPP_UNSTEERABLE_NOTE
from server.steering.plan import Positions


class VectorFormat(StrEnum):
    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    PT = "pt"

    @property
    def media_type(self) -> str:
        return "application/octet-stream"

    @classmethod
    def from_filename(cls, filename: str) -> VectorFormat:
        suffix = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
        try:
            return cls(suffix)
        except ValueError:
            raise FormatError(
                f"cannot tell the format of {filename!r}: name it *.safetensors, *.gguf or *.pt, "
                "or say format=...",
                param="format",
            ) from None


@dataclass(frozen=True)
class ImportOptions:
    model: str
    format: VectorFormat | None = None  # None: from the file name
    layers: list[int] | None = None  # for .pt, which hold every block: the blocks to keep
    default_strength: float | None = None  # None: the file's own metadata, else 1.0
    default_positions: str | None = None
    description: str | None = None
    expected_version: int | None = None


@dataclass(frozen=True)
class ExportedFile:
    content: bytes
    filename: str


def _read(data: bytes, fmt: VectorFormat, layers: list[int] | None) -> VectorFile:
    if fmt is VectorFormat.PT:
        if not layers:
            raise FormatError(
                "a persona_vectors .pt file holds every block: say which to import with layers=...",
                param="layers",
            )
        return read_persona_vectors_pt(data, layers)
    vectors = read_safetensors(data) if fmt is VectorFormat.SAFETENSORS else read_gguf_control_vector(data)
    if layers:
        missing = sorted(set(layers) - set(vectors.vectors))
        if missing:
            raise FormatError(f"the file has no vector for block(s) {missing}", param="layers")
        vectors = VectorFile({layer: vectors.vectors[layer] for layer in layers}, vectors.metadata)
    return vectors


class PersonaFiles:
    def __init__(self, registry: ModelRegistry, store: PersonaStore, admin: PersonaAdmin) -> None:
        self._registry = registry
        self._store = store
        self._admin = admin

    async def import_file(self, name: str, data: bytes, filename: str, options: ImportOptions) -> PersonaInfo:
        self._admin.check_name(name)
        self._registry.get(options.model)  # an unknown model is a 404 before the file is even parsed
        fmt = options.format or VectorFormat.from_filename(filename)
        try:
            loaded = _read(data, fmt, options.layers)
        except FormatError as exc:
            exc.param = exc.param or "file"
            raise
        # Our own safetensors exports carry the record's settings; what the request says wins.
        meta = loaded.metadata
        strength = options.default_strength
        if strength is None:
            strength = _float(meta.get("default_strength"), 1.0)
        positions = options.default_positions or meta.get("default_positions", "all")
        if positions not in {p.value for p in Positions}:
            positions = "all"
        description = options.description if options.description is not None else meta.get("description", "")
        return await self._admin.put(
            name=name,
            model=options.model,
            layers={layer: vector.tolist() for layer, vector in loaded.vectors.items()},
            default_strength=strength,
            default_positions=positions,
            description=description,
            expected_version=options.expected_version,
            provenance={"kind": "imported", "format": fmt.value, "filename": filename[:200]},
        )

    async def export_file(
        self, name: str, model: str, fmt: VectorFormat, version: int | None = None
    ) -> ExportedFile:
        self._admin.check_name(name)
        record = await (
            self._store.get(model, name) if version is None else self._store.get_version(model, name, version)
        )
        stem = f"{name}.v{record.info.version}"
        if fmt is VectorFormat.SAFETENSORS:
            content = write_safetensors(record.vectors, _metadata(record))
        elif fmt is VectorFormat.GGUF:
            if min(record.vectors) < LLAMA_CPP_FIRST_STEERABLE_BLOCK:  # the file holds direction.1 upwards
                message = f"{LLAMA_CPP_UNSTEERABLE_NOTE}; re-upload the persona without it"
                raise FormatError(message, param="format")
            content = write_gguf_control_vector(record.vectors, model_hint=model)
        else:
            num_blocks = len(self._registry.get(model).info.steerable_layers)
            content = write_persona_vectors_pt(record.vectors, num_blocks)
        return ExportedFile(content, f"{stem}.{fmt.value}")


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def _metadata(record: PersonaRecord) -> dict[str, str]:
    info: dict[str, Any] = record.info.to_dict()
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()}
