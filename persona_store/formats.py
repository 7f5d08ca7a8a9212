"""Persona vector files in and out: safetensors, GGUF control vectors, persona_vectors .pt.

Layer indices here are decoder block indices, as everywhere in persona-server. The edges convert:
- persona_vectors ``.pt``: a tensor [n_layers + 1, hidden] whose row k is ``hidden_states[k]``, so row
  k is block k - 1 (row 0, the embeddings, has no block and is dropped);
- GGUF control vectors (llama.cpp, repeng): tensor ``direction.N`` is added after block N;
- safetensors: one tensor ``layer.N`` per block N, the record's metadata as string metadata.
Malformed files raise ``FormatError`` and nothing is returned.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 512 * 1024 * 1024


class FormatError(ValueError):
    """A vector file that cannot be read as what it claims to be; ``param`` names the request field
    at fault when a server knows it (the file, or the format it was read as)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class VectorFile:
    vectors: dict[int, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)


def _checked(vectors: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    if not vectors:
        raise FormatError("the file holds no layer vector")
    sizes = set()
    for layer, vector in vectors.items():
        if layer < 0:
            raise FormatError(f"layer indices are non-negative, got {layer}")
        if vector.ndim != 1:
            raise FormatError(f"the vector of layer {layer} must be 1-D, got shape {vector.shape}")
        if not np.isfinite(vector).all():
            raise FormatError(f"the vector of layer {layer} holds NaN or infinite values")
        sizes.add(vector.shape[0])
    if len(sizes) != 1:
        raise FormatError(f"the layer vectors differ in size: {sorted(sizes)}")
    return {layer: np.ascontiguousarray(vectors[layer], dtype=np.float32) for layer in sorted(vectors)}


def _size_checked(data: bytes) -> bytes:
    if len(data) > MAX_FILE_BYTES:
        raise FormatError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    return data


# safetensors ---------------------------------------------------------------------------------


def write_safetensors(vectors: dict[int, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    tensors = {f"layer.{layer}": vector for layer, vector in _checked(vectors).items()}
    return save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})


def read_safetensors(data: bytes) -> VectorFile:
    from safetensors.numpy import load

    _size_checked(data)
    if len(data) < 8:
        raise FormatError("not a safetensors file: too short")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise FormatError(f"the safetensors header claims {header_size} bytes, the file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + header_size])
        tensors = load(data)
    except Exception as exc:
        raise FormatError(f"not a valid safetensors file: {exc}") from exc
    vectors = {}
    for name, tensor in tensors.items():
        prefix, _, index = name.partition(".")
        if prefix != "layer" or not index.isdigit():
            raise FormatError(f"unexpected tensor {name!r}: tensors are named layer.<block index>")
        vectors[int(index)] = tensor.astype(np.float32)
    return VectorFile(_checked(vectors), dict(header.get("__metadata__") or {}))


# persona_vectors .pt -------------------------------------------------------------------------


def write_persona_vectors_pt(vectors: dict[int, np.ndarray], num_layers: int) -> bytes:
    import torch

    checked = _checked(vectors)
    hidden = next(iter(checked.values())).shape[0]
    table = torch.zeros(num_layers + 1, hidden)
    for layer, vector in checked.items():
        if layer >= num_layers:
            raise FormatError(f"layer {layer} is outside a model of {num_layers} blocks")
        table[layer + 1] = torch.from_numpy(vector)
    buffer = io.BytesIO()
    torch.save(table, buffer)
    return buffer.getvalue()


def read_persona_vectors_pt(data: bytes, layers: list[int] | None = None) -> VectorFile:
    """Rows 1..n as blocks 0..n-1 (all, or only ``layers``); only tensors load, never pickled code."""
    import torch

    _size_checked(data)
    try:
        table = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise FormatError(f"not a loadable tensor file (only plain tensors are accepted): {exc}") from exc
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[0] < 2:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise FormatError(f"expected a tensor [n_layers + 1, hidden], got {shape}")
    blocks = layers if layers is not None else list(range(table.shape[0] - 1))
    vectors = {}
    for block in blocks:
        if not 0 <= block < table.shape[0] - 1:
            raise FormatError(f"block {block} is outside the file's {table.shape[0] - 1} blocks")
        vectors[block] = table[block + 1].float().numpy()
    return VectorFile(_checked(vectors))


# GGUF control vectors ------------------------------------------------------------------------

_ARCH = "controlvector"


def write_gguf_control_vector(vectors: dict[int, np.ndarray], model_hint: str) -> bytes:
    return gguf_file_bytes(_checked(vectors), {f"{_ARCH}.model_hint": model_hint})


def gguf_file_bytes(vectors: dict[int, np.ndarray], strings: dict[str, str]) -> bytes:
    """A control-vector GGUF file of exactly these tensors, unchecked (tests use it to write bad files)."""
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "control.gguf"
        writer = GGUFWriter(str(path), _ARCH)
        for key, value in strings.items():
            writer.add_string(key, value)
        writer.add_uint32(f"{_ARCH}.layer_count", len(vectors))
        for layer, vector in vectors.items():
            writer.add_tensor(f"direction.{layer}", vector)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def read_gguf_control_vector(data: bytes) -> VectorFile:
    from gguf import GGUFReader

    _size_checked(data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "control.gguf"
        path.write_bytes(data)
        try:
            reader = GGUFReader(str(path))
            vectors, metadata = {}, {}
            for tensor in reader.tensors:
                prefix, _, index = tensor.name.partition(".")
                if prefix != "direction" or not index.isdigit():
                    raise FormatError(
                        f"unexpected tensor {tensor.name!r}: control vectors hold direction.<N>"
                    )
                vectors[int(index)] = np.array(tensor.data, dtype=np.float32).reshape(-1)
                if len(tensor.shape) != 1 and int(np.prod(tensor.shape)) != max(tensor.shape):
                    raise FormatError(f"{tensor.name} must be 1-D")
            for key in (f"{_ARCH}.model_hint", f"{_ARCH}.layer_count"):
                found = reader.fields.get(key)
                if found is not None:
                    metadata[key] = str(found.contents())
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(f"not a valid GGUF control vector: {exc}") from exc
    return VectorFile(_checked(vectors), metadata)
