"""Admin import/export of vector files (multipart uploads), version history and restore, over HTTP."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from persona_store.formats import read_gguf_control_vector, read_safetensors, write_safetensors
from testkit.server_process import ServerProcess
from tests.api_helpers import ADMIN_KEY, LLAMA, QWEN, assert_openai_error, random_vector, upload

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp]  # the session server

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def export(server: ServerProcess, name: str, fmt: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{server.url}/admin/personas/{name}/export",
        params={"model": LLAMA, "format": fmt, **params},
        headers=ADMIN,
        timeout=30,
    )


def import_file(
    server: ServerProcess,
    name: str,
    filename: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    **form: Any,
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/personas/{name}/import",
        files={"file": (filename, data)},
        data={"model": LLAMA, **form},
        headers={**ADMIN, **(headers or {})},
        timeout=30,
    )


def stored(server: ServerProcess, name: str, model: str = LLAMA) -> httpx.Response:
    return httpx.get(f"{server.url}/admin/personas/{name}", params={"model": model}, headers=ADMIN)


@pytest.fixture(scope="module")
def source(server: ServerProcess) -> dict[str, Any]:
    layers = {1: random_vector(64, 11), 2: random_vector(64, 12)}
    response = upload(
        server.url,
        "exportable",
        LLAMA,
        layers,
        2.5,
        default_positions="prompt",
        description="to be carried around",
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "pt"])
def test_an_exported_file_imports_back_to_the_same_vectors(
    server: ServerProcess, source: dict[str, Any], fmt: str
) -> None:
    exported = export(server, "exportable", fmt)
    assert exported.status_code == 200, exported.text
    filename = exported.headers["content-disposition"].split("filename=")[1].strip('"')
    assert filename == f"exportable.v{source['version']}.{fmt}"
    form = {"layers": "1,2"} if fmt == "pt" else {}
    imported = import_file(server, f"imported-{fmt}", filename, exported.content, **form)
    assert imported.status_code == 200, imported.text
    record = imported.json()
    assert record["checksum"] == source["checksum"] and record["layers"] == [1, 2]
    assert record["provenance"] == {"kind": "imported", "format": fmt, "filename": filename}
    # Only our safetensors carry the record's settings; the other formats hold bare vectors.
    if fmt == "safetensors":
        assert (record["default_strength"], record["default_positions"]) == (2.5, "prompt")
        assert record["description"] == "to be carried around"
    else:
        assert (record["default_strength"], record["default_positions"]) == (1.0, "all")


def test_the_gguf_export_is_a_llama_cpp_control_vector(server: ServerProcess, source: dict[str, Any]) -> None:
    read = read_gguf_control_vector(export(server, "exportable", "gguf").content)
    assert read.metadata["controlvector.model_hint"] == LLAMA
    assert read.metadata["controlvector.layer_count"] == "2"
    vectors = stored(server, "exportable").json()["layers"]
    for layer, vector in read.vectors.items():  # direction.N is added after block N
        assert np.allclose(vector, vectors[str(layer)])


def test_block_0_cannot_go_to_llama_cpp(server: ServerProcess) -> None:
    assert upload(server.url, "low", LLAMA, {0: random_vector(64, 1)}).status_code == 200
    assert_openai_error(export(server, "low", "gguf"), 400, "block 0")


def test_form_fields_override_the_file_and_pick_blocks(server: ServerProcess) -> None:
    data = write_safetensors({1: np.ones(64), 2: np.full(64, 2.0)}, {"default_strength": "9"})
    response = import_file(
        server,
        "picked",
        "v.safetensors",
        data,
        layers="2",
        default_strength="4",
        default_positions="response",
        description="only block 2",
    )
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["layers"] == [2] and record["description"] == "only block 2"
    assert (record["default_strength"], record["default_positions"]) == (4.0, "response")
    assert stored(server, "picked").json()["layers"] == {"2": [2.0] * 64}


class Pickled:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


def pickle_payload() -> bytes:
    buffer = io.BytesIO()
    torch.save({"vector": Pickled()}, buffer)
    return buffer.getvalue()


def raw_safetensors(vectors: dict[int, np.ndarray]) -> bytes:
    """A file written without our writer's checks, as another tool might."""
    from safetensors.numpy import save

    return save({f"layer.{layer}": np.asarray(v, np.float32) for layer, v in vectors.items()})


GOOD = raw_safetensors({1: np.ones(64)})


@pytest.mark.parametrize(
    ("filename", "data", "form", "status", "fragment"),
    [
        ("v.safetensors", GOOD[:-9], {}, 400, "safetensors"),  # truncated
        ("v.safetensors", b"\xff" * 8 + b"{}", {}, 400, "header claims"),  # huge declared header
        ("v.safetensors", raw_safetensors({1: np.full(64, np.nan)}), {}, 400, "NaN"),
        ("v.safetensors", raw_safetensors({1: np.full(64, 1e37)}), {}, 422, "overflow"),  # x 50: inf
        ("v.safetensors", raw_safetensors({1: np.ones(48)}), {}, 422, "hidden size"),  # a qwen vector
        ("v.safetensors", raw_safetensors({9: np.ones(64)}), {}, 422, "outside model"),
        ("v.safetensors", GOOD, {"layers": "3"}, 400, "no vector for block"),
        ("v.pt", pickle_payload(), {"layers": "1"}, 400, "only plain tensors"),
        ("v.pt", GOOD, {}, 400, "layers="),  # .pt without the blocks to keep
        ("v.gguf", b"GGUF" + b"\x00" * 40, {}, 400, "GGUF"),
        ("v.bin", GOOD, {}, 400, "cannot tell the format"),
        ("v.safetensors", GOOD, {"layers": "1;2"}, 422, "layers"),
        ("v.safetensors", GOOD, {"default_strength": "nan"}, 422, "default_strength"),
        ("v.safetensors", GOOD, {"default_strength": "1000"}, 400, "default_strength"),
        ("v.safetensors", GOOD, {"format": "onnx"}, 422, "format"),
    ],
)
def test_malformed_imports_are_refused_and_store_nothing(
    server: ServerProcess,
    filename: str,
    data: bytes,
    form: dict[str, str],
    status: int,
    fragment: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    response = import_file(server, "refused", filename, data, **form)
    assert_openai_error(response, status, fragment)
    assert stored(server, "refused").status_code == 404


def test_imports_to_unknown_models_and_bad_names_are_refused(server: ServerProcess) -> None:
    response = import_file(server, "nowhere", "v.safetensors", GOOD, model="no-such-model")
    assert_openai_error(response, 404, "no-such-model")
    response = httpx.post(f"{server.url}/admin/personas/nowhere/import", data={"model": LLAMA}, headers=ADMIN)
    assert_openai_error(response, 422, "file")
    assert (
        httpx.post(
            f"{server.url}/admin/personas/bad%20name/import",
            files={"file": ("v.pt", b"")},
            data={"model": LLAMA},
            headers=ADMIN,
        ).status_code
        == 422
    )
    anonymous = httpx.post(
        f"{server.url}/admin/personas/x/import",
        files={"file": ("v.pt", b"")},
        data={"model": LLAMA},
        headers={"Authorization": "Bearer wrong"},
    )
    assert anonymous.status_code == 401


def test_versions_are_listed_and_an_old_one_restored(server: ServerProcess) -> None:
    first = upload(server.url, "history", QWEN, {1: random_vector(48, 1)}, 1.5).json()
    second = upload(server.url, "history", QWEN, {2: random_vector(48, 2)}, 3.0, if_match=1).json()
    versions_url = f"{server.url}/admin/personas/history/versions"
    listed = httpx.get(versions_url, params={"model": QWEN}, headers=ADMIN).json()["data"]
    assert [(v["version"], v["checksum"]) for v in listed] == [
        (2, second["checksum"]),
        (1, first["checksum"]),
    ]

    restore_url = f"{server.url}/admin/personas/history/restore"
    stale = httpx.post(restore_url, json={"model": QWEN, "version": 1}, headers={**ADMIN, "If-Match": "1"})
    assert_openai_error(stale, 409, "version 2")
    missing = httpx.post(restore_url, json={"model": QWEN, "version": 7}, headers=ADMIN)
    assert_openai_error(missing, 404, "version 7")
    restored = httpx.post(restore_url, json={"model": QWEN, "version": 1}, headers={**ADMIN, "If-Match": "2"})
    assert restored.status_code == 200, restored.text
    body = restored.json()
    assert (body["version"], body["checksum"], body["default_strength"]) == (3, first["checksum"], 1.5)
    assert body["provenance"]["restored_from"] == 1
    old = httpx.get(
        f"{server.url}/admin/personas/history/export",
        params={"model": QWEN, "format": "safetensors", "version": 2},
        headers=ADMIN,
    )
    assert list(read_safetensors(old.content).vectors) == [2]
    assert_openai_error(httpx.get(versions_url, params={"model": LLAMA}, headers=ADMIN), 404, "history")
