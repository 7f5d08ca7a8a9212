"""Persona vector files: round trips, the layer conventions at the edges, and malformed files refused."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from persona_store.formats import (
    FormatError,
    gguf_file_bytes,
    read_gguf_control_vector,
    read_persona_vectors_pt,
    read_safetensors,
    write_gguf_control_vector,
    write_persona_vectors_pt,
    write_safetensors,
)

RNG = np.random.default_rng(0)
VECTORS = {2: RNG.standard_normal(32).astype(np.float32), 5: RNG.standard_normal(32).astype(np.float32)}


def assert_same(vectors: dict[int, np.ndarray]) -> None:
    assert list(vectors) == list(VECTORS)
    for layer, vector in VECTORS.items():
        assert np.array_equal(vectors[layer], vector)


def test_safetensors_round_trip_with_metadata() -> None:
    read = read_safetensors(write_safetensors(VECTORS, {"name": "pirate", "default_strength": "2.5"}))
    assert_same(read.vectors)
    assert read.metadata == {"name": "pirate", "default_strength": "2.5"}


def test_gguf_control_vector_round_trip() -> None:
    read = read_gguf_control_vector(write_gguf_control_vector(VECTORS, model_hint="llama"))
    assert_same(read.vectors)
    assert "llama" in read.metadata["controlvector.model_hint"]
    assert read.metadata["controlvector.layer_count"] == "2"


def test_persona_vectors_pt_rows_are_hidden_states_so_row_k_is_block_k_minus_1() -> None:
    data = write_persona_vectors_pt(VECTORS, num_layers=8)
    table = torch.load(io.BytesIO(data), weights_only=True)
    assert table.shape == (9, 32)
    assert torch.equal(table[3], torch.from_numpy(VECTORS[2]))  # block 2 is hidden_states[3]
    assert_same(read_persona_vectors_pt(data, layers=[2, 5]).vectors)
    assert list(read_persona_vectors_pt(data).vectors) == list(range(8))


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        struct.pack("<Q", 10**12) + b"{}",  # a header far larger than the file
        write_safetensors(VECTORS)[:-10],  # truncated
    ],
)
def test_malformed_safetensors_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError):
        read_safetensors(data)


def test_safetensors_with_nan_or_mixed_sizes_are_refused() -> None:
    from safetensors.numpy import save

    with pytest.raises(FormatError, match="NaN"):
        read_safetensors(save({"layer.1": np.array([np.nan, 1.0], dtype=np.float32)}))
    with pytest.raises(FormatError, match="differ in size"):
        read_safetensors(save({"layer.1": np.ones(3, np.float32), "layer.2": np.ones(4, np.float32)}))
    with pytest.raises(FormatError, match="1-D"):
        read_safetensors(save({"layer.1": np.ones((2, 3), np.float32)}))
    with pytest.raises(FormatError, match="unexpected tensor"):
        read_safetensors(save({"weights": np.ones(3, np.float32)}))


def test_pt_files_load_tensors_only_never_code(capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.BytesIO()
    torch.save({"vectors": Payload()}, buffer)
    with pytest.raises(FormatError, match="only plain tensors"):
        read_persona_vectors_pt(buffer.getvalue())
    assert "pickled code ran" not in capsys.readouterr().out
    flat = io.BytesIO()
    torch.save(torch.ones(5), flat)
    with pytest.raises(FormatError, match="n_layers"):
        read_persona_vectors_pt(flat.getvalue())
    with pytest.raises(FormatError):
        read_persona_vectors_pt(b"not a zip at all")


def test_malformed_gguf_is_refused() -> None:
    good = write_gguf_control_vector(VECTORS, model_hint="llama")
    with pytest.raises(FormatError):
        read_gguf_control_vector(good[: len(good) // 2])
    with pytest.raises(FormatError):
        read_gguf_control_vector(b"GGUF" + b"\xff" * 64)
    with pytest.raises(FormatError, match="NaN"):
        read_gguf_control_vector(gguf_file_bytes({1: np.array([np.nan, 1], np.float32)}, {}))
