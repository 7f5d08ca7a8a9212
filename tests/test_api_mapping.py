"""Fitting a map between two served models and carrying personas across, over the admin API."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
from matplotlib.image import imread

from testkit.server_process import ServerProcess
from tests.api_helpers import (
    ADMIN_KEY,
    GGUF,
    LLAMA,
    QUESTION,
    QWEN,
    assert_openai_error,
    finished_job,
    random_vector,
    upload,
)

# Fits that read llama.cpp's block outputs: minutes.
pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp, pytest.mark.slow]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def fit(server: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/mappings", json=body, headers=ADMIN, timeout=30)


def map_persona(server: ServerProcess, name: str, **body: Any) -> httpx.Response:
    """The map request: 202 with its job, or the refusal."""
    return httpx.post(f"{server.url}/admin/personas/{name}/map", json=body, headers=ADMIN, timeout=30)


def map_job(server: ServerProcess, name: str, **body: Any) -> dict[str, Any]:
    """A map request's job, once it ended (the generated method answers, reads back and calibrates:
    up to a minute here)."""
    started = map_persona(server, name, **body)
    assert started.status_code == 202, started.text
    assert started.json()["status_url"] == f"/admin/jobs/{started.json()['id']}"
    return finished_job(server.url, started.json()["status_url"], ADMIN, timeout=180)


def mapped(server: ServerProcess, name: str, **body: Any) -> dict[str, Any]:
    """The persona a map request stored (its job succeeded)."""
    job = map_job(server, name, **body)
    assert job["status"] == "succeeded" and job["kind"] == "map", job
    assert job["result"]["source_updated"] is False and job["result"]["warning"] is None
    return job["result"]["persona"]


@pytest.fixture(scope="module")
def fitted(server: ServerProcess) -> dict[str, Any]:
    assert upload(server.url, "bridge", LLAMA, {1: random_vector(64, 70)}, 3.0).status_code == 200
    for index, name in enumerate(("concept-a", "concept-b")):  # native on both models
        assert upload(server.url, name, LLAMA, {1: random_vector(64, 80 + index)}).status_code == 200
        assert upload(server.url, name, QWEN, {1: random_vector(48, 90 + index)}).status_code == 200
    started = fit(server, source_model=LLAMA, target_model=QWEN, folds=4)
    assert started.status_code == 202, started.text
    job = finished_job(server.url, started.json()["status_url"], ADMIN, timeout=120)
    assert job["status"] == "succeeded", job
    return job["result"]


def test_a_fit_stores_ridge_and_procrustes_maps_with_diagnostics(
    server: ServerProcess, fitted: dict[str, Any]
) -> None:
    assert fitted["layers"] == {"0": 0, "1": 1, "2": 2}  # 3 blocks each: the same relative depths
    assert fitted["corpus"] == "demo-neutral.txt"  # no texts given: the shipped default corpus
    for diagnostics in fitted["diagnostics"].values():
        assert len(diagnostics["cv_mse"]) == 5 and diagnostics["lambda"] in diagnostics["lambdas"]
        assert -1.0 < diagnostics["r2"] <= 1.0 and diagnostics["effective_rank"] > 1
    listed = httpx.get(f"{server.url}/admin/mappings", headers=ADMIN).json()["data"]
    methods = {m["id"]: m["method"] for m in listed}
    assert (
        methods[fitted["mapping_id"]] == "ridge" and methods[fitted["procrustes_mapping_id"]] == "procrustes"
    )
    info = httpx.get(f"{server.url}/admin/mappings/{fitted['mapping_id']}", headers=ADMIN).json()
    assert (info["source_hidden_size"], info["target_hidden_size"]) == (64, 48)
    picture = httpx.get(f"{server.url}/admin/mappings/{fitted['mapping_id']}/diagnostics.png", headers=ADMIN)
    assert picture.headers["content-type"] == "image/png"
    drawn = imread(io.BytesIO(picture.content), format="png")
    assert drawn.shape == (400, 1000, 4) and drawn[..., :3].std() > 0  # two 5 x 4 inch panels at 100 dpi
    no_cv = httpx.get(
        f"{server.url}/admin/mappings/{fitted['procrustes_mapping_id']}/diagnostics.png", headers=ADMIN
    )
    assert_openai_error(no_cv, 404, "procrustes")
    assert info["metadata"]["texts"] > 100 and info["metadata"]["corpus"] == "demo-neutral.txt"


def test_a_mapped_persona_is_stored_calibrated_and_serves(
    server: ServerProcess, fitted: dict[str, Any], client: Any
) -> None:
    record = mapped(server, "bridge", source_model=LLAMA, target_model=QWEN, method="ridge")
    assert (record["model"], record["layers"], record["hidden_size"]) == (QWEN, [1], 48)
    assert record["provenance"] == {
        "kind": "mapped",
        "source_model": LLAMA,
        "source_name": "bridge",
        "source_version": 1,
        "method": "ridge",
        "mapping_id": fitted["mapping_id"],
    }
    assert record["default_strength"] == 3.0
    norms = httpx.get(f"{server.url}/admin/mappings/{fitted['mapping_id']}", headers=ADMIN).json()["metadata"]
    vector = np.array(
        httpx.get(f"{server.url}/admin/personas/bridge", params={"model": QWEN}, headers=ADMIN).json()[
            "layers"
        ]["1"]
    )
    wanted = np.linalg.norm(random_vector(64, 70)) / norms["source_norms"]["1"] * norms["target_norms"]["1"]
    assert np.linalg.norm(vector) == pytest.approx(wanted, rel=1e-4)
    answer = client.chat.completions.create(
        model=QWEN, messages=QUESTION, max_tokens=4, extra_body={"persona": "bridge"}
    )
    assert answer.model_extra["persona"]["version"] == record["version"]


@pytest.mark.parametrize(
    "method", ["procrustes", "concept", "zero_pad", "interpolate", "random", "generated"]
)
def test_every_method_maps(server: ServerProcess, fitted: dict[str, Any], method: str) -> None:
    record = mapped(server, "bridge", source_model=LLAMA, target_model=QWEN, method=method)
    assert record["provenance"]["method"] == method and record["hidden_size"] == 48
    if method == "generated":  # the vectors' scale is calibrated on the target, at the source's default
        calibration = record["provenance"]["strength_calibration"]
        assert record["default_strength"] == calibration["strength"] == 3.0
        assert calibration["scale"] in [step["scale"] for step in calibration["steps"]]
        # A persona on one block is tried around the same depth; the best forecast is kept (the
        # first of equals, nearest first).
        tried = calibration["blocks_tried"]
        assert len(tried) >= 2 and tried[0]["blocks"] == [1]  # the same relative depth comes first
        kept = max(tried, key=lambda placement: placement["predicted_transfer"])
        assert list(record["layers"]) == kept["blocks"]
        assert calibration["predicted_transfer"] == kept["predicted_transfer"]
        assert 0.0 <= calibration["predicted_transfer"] <= 1.0
    picture_url = f"{server.url}/admin/personas/bridge/calibration.png"
    picture = httpx.get(picture_url, params={"model": QWEN}, headers=ADMIN)
    if method == "generated":
        assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    else:  # a map keeps the source's strength: nothing was calibrated
        assert_openai_error(picture, 404, "no strength calibration")


def running_map(server: ServerProcess, name: str, **body: Any) -> str:
    """A generated map's job, once it has made progress: its status URL."""
    started = map_persona(server, name, **body)
    assert started.status_code == 202, started.text
    status_url = started.json()["status_url"]
    for _ in range(600):
        job = httpx.get(f"{server.url}{status_url}", headers=ADMIN).json()
        if job["status"] == "running" and job["progress"] > 0:
            return status_url
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"the map made no progress: {job}")


def test_a_generated_map_reports_progress_and_a_cancelled_one_stores_nothing(
    server: ServerProcess, client: Any
) -> None:
    assert upload(server.url, "gauge", LLAMA, {1: random_vector(64, 150)}, 2.0).status_code == 200
    seen: list[float] = []
    started = map_persona(server, "gauge", source_model=LLAMA, target_model=QWEN)
    job = finished_job(
        server.url, started.json()["status_url"], ADMIN, 180, lambda j: seen.append(j["progress"])
    )
    assert job["status"] == "succeeded", job
    assert seen == sorted(seen) and len(set(seen)) >= 3 and seen[-1] == 1.0  # it moves, and only forward
    status_url = running_map(server, "gauge", source_model=LLAMA, target_model=QWEN, target_name="gauge-2")
    cancelled = httpx.delete(f"{server.url}{status_url}", headers=ADMIN).json()
    assert cancelled["status"] == "cancelled"
    time.sleep(1)  # were it still running, it would store now
    assert httpx.get(f"{server.url}{status_url}", headers=ADMIN).json()["status"] == "cancelled"
    missing = httpx.get(f"{server.url}/admin/personas/gauge-2", params={"model": QWEN}, headers=ADMIN)
    assert_openai_error(missing, 404, "gauge-2")
    answer = client.chat.completions.create(model=QWEN, messages=QUESTION, max_tokens=4)  # serves on
    assert answer.usage.completion_tokens == 4


def test_a_source_updated_while_it_is_mapped_is_reported(server: ServerProcess) -> None:
    assert upload(server.url, "tide", LLAMA, {1: random_vector(64, 160)}).status_code == 200
    status_url = running_map(server, "tide", source_model=LLAMA, target_model=QWEN)
    assert upload(server.url, "tide", LLAMA, {1: random_vector(64, 161)}).status_code == 200  # version 2
    job = finished_job(server.url, status_url, ADMIN, timeout=180)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["source_updated"] is True and result["source_version"] == 1
    assert "'tide'" in result["warning"] and "updated to version 2" in result["warning"]
    assert result["persona"]["provenance"]["source_version"] == 1  # what was carried is on record


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"source_model": "nope", "target_model": QWEN}, 404, "nope"),
        ({"source_model": LLAMA, "target_model": LLAMA}, 400, "same model"),
        ({"source_model": LLAMA, "target_model": QWEN, "layers": {"5": 1}}, 422, "source block 5"),
        ({"source_model": LLAMA, "target_model": QWEN, "layers": {"1": 9}}, 422, "target block 9"),
        ({"source_model": LLAMA, "target_model": QWEN, "texts": ["a", "b", "c"]}, 400, "too few"),
        ({"source_model": LLAMA, "target_model": QWEN, "folds": 1}, 422, "folds"),
        ({"source_model": LLAMA, "target_model": QWEN, "lambdas": [-1]}, 422, "lambdas"),
    ],
)
def test_bad_fits_are_refused(
    server: ServerProcess, body: dict[str, Any], status: int, fragment: str
) -> None:
    assert_openai_error(fit(server, **body), status, fragment)


def test_bad_maps_are_refused(server: ServerProcess, fitted: dict[str, Any]) -> None:
    def refused(name: str, status: int, fragment: str, **body: Any) -> None:
        assert_openai_error(map_persona(server, name, **body), status, fragment)

    forward = {"source_model": LLAMA, "target_model": QWEN}
    refused("bridge", 400, "POST /admin/mappings", source_model=QWEN, target_model=LLAMA, method="ridge")
    refused("bridge", 422, "not ridge", mapping_id=fitted["procrustes_mapping_id"], **forward)
    refused("bridge", 404, "map-000000000000", mapping_id="map-000000000000", **forward)
    refused("bridge", 400, "not a mapping id", mapping_id="../etc", **forward)
    refused("ghost", 404, "ghost", **forward)
    refused("bridge", 422, "method", method="magic", **forward)
    assert upload(server.url, "lonely", QWEN, {2: random_vector(48, 5)}).status_code == 200
    refused("lonely", 422, "concept adapter", source_model=QWEN, target_model=LLAMA, method="concept")


def stored(server: ServerProcess, name: str, model: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/admin/personas/{name}", params={"model": model}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def source_and_native_target(server: ServerProcess, name: str, seed: int) -> dict[str, Any]:
    """``name`` on LLAMA (the source) and a native ``name`` on QWEN (the target): the latter's record."""
    assert upload(server.url, name, LLAMA, {1: random_vector(64, seed)}).status_code == 200
    native = upload(server.url, name, QWEN, {2: random_vector(48, seed + 1)}, 4.0)
    assert native.status_code == 200, native.text
    return stored(server, name, QWEN)


# zero_pad needs no fitted map, so these tests do not wait for a fit.
FORWARD = {"source_model": LLAMA, "target_model": QWEN, "method": "zero_pad"}


def test_mapping_onto_a_native_persona_of_that_name_is_409_and_keeps_it(server: ServerProcess) -> None:
    native = source_and_native_target(server, "anchor", 100)
    refused = map_persona(server, "anchor", **FORWARD)
    error = assert_openai_error(refused, 409, "'anchor'", QWEN, "uploaded", "target_name", "replace")
    assert (error["param"], error["code"]) == ("target_name", "persona_exists")
    assert stored(server, "anchor", QWEN) == native  # same version, same vectors, same everything
    # A deleted persona (no current version) does not block.
    assert (
        httpx.delete(f"{server.url}/admin/personas/anchor", params={"model": QWEN}, headers=ADMIN).status_code
        == 204
    )
    assert mapped(server, "anchor", **FORWARD)["version"] == native["version"] + 1  # versions never repeat


def test_target_name_stores_the_mapped_persona_under_another_name(server: ServerProcess) -> None:
    native = source_and_native_target(server, "keel", 110)
    record = mapped(server, "keel", target_name="keel-from-llama", **FORWARD)
    assert (record["name"], record["model"], record["version"]) == ("keel-from-llama", QWEN, 1)
    assert record["provenance"]["source_name"] == "keel" and record["provenance"]["kind"] == "mapped"
    assert stored(server, "keel", QWEN) == native
    bad = map_persona(server, "keel", target_name="../keel", **FORWARD)
    assert assert_openai_error(bad, 422, "target_name")["param"] == "target_name"


def test_replace_true_replaces_a_native_persona(server: ServerProcess) -> None:
    native = source_and_native_target(server, "mast", 120)
    record = mapped(server, "mast", replace=True, **FORWARD)
    assert record["version"] == native["version"] + 1 and record["layers"] == [1]
    assert record["provenance"]["kind"] == "mapped" and record["provenance"]["source_model"] == LLAMA


def test_a_persona_mapped_from_the_same_source_is_remapped_without_replace(server: ServerProcess) -> None:
    for name, seed in (("hull", 130), ("deck", 131)):
        assert upload(server.url, name, LLAMA, {1: random_vector(64, seed)}).status_code == 200
    first = mapped(server, "hull", target_name="hull-mapped", **FORWARD)
    again = mapped(server, "hull", target_name="hull-mapped", **{**FORWARD, "method": "interpolate"})
    assert again["version"] == first["version"] + 1
    assert again["provenance"]["method"] == "interpolate"
    # Another source persona mapped onto that name is another persona: refused unless replace.
    other = map_persona(server, "deck", target_name="hull-mapped", **FORWARD)
    error = assert_openai_error(other, 409, "'hull-mapped'", "mapped from 'hull'", LLAMA)
    assert error["code"] == "persona_exists"
    assert stored(server, "hull-mapped", QWEN)["version"] == again["version"]


def test_the_map_commands_fit_list_and_map(server: ServerProcess) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    env = {"PERSONA_SERVER_ADMIN_KEY": ADMIN_KEY}
    assert upload(server.url, "cli-bridge", QWEN, {1: random_vector(48, 71)}).status_code == 200
    fitted = CliRunner().invoke(
        app,
        [
            *["map", "fit", "--source", QWEN, "--target", LLAMA, "--layers", "1:1", "--folds", "3"],
            *["--url", server.url],
        ],
        env=env,
    )
    assert fitted.exit_code == 0, fitted.output
    assert fitted.output.startswith("ridge mapping map-") and "block 1 -> 1: lambda" in fitted.output
    listed = CliRunner().invoke(app, ["map", "list", "--url", server.url], env=env)
    assert f"ridge\t{QWEN} -> {LLAMA}" in listed.output
    mapped = CliRunner().invoke(
        app,
        ["map", "persona", "cli-bridge", "--source", QWEN, "--target", LLAMA, "--url", server.url],
        env=env,
    )
    stored, calibrated = mapped.output.splitlines()  # the default method, generated, says its scale
    # (A persona on one block lands where its calibration forecasts the most, near the same depth.)
    assert mapped.exit_code == 0 and stored.startswith(f"stored cli-bridge for {LLAMA}: version 1, blocks [")
    assert calibrated.startswith("scale ") and "predicted transfer" in calibrated
    assert calibrated.endswith(f"/admin/personas/cli-bridge/calibration.png?model={LLAMA}")
    refused = CliRunner().invoke(
        app, ["map", "fit", "--source", QWEN, "--target", QWEN, "--url", server.url], env=env
    )
    assert refused.exit_code == 1 and "same model" in refused.output


def test_the_map_persona_command_passes_target_name_and_replace(server: ServerProcess) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    native = source_and_native_target(server, "rudder", 140)

    def run(*flags: str) -> tuple[int, str]:
        result = CliRunner().invoke(
            app,
            [
                *["map", "persona", "rudder", "--source", LLAMA, "--target", QWEN, "--method", "zero_pad"],
                *[*flags, "--url", server.url],
            ],
            env={"PERSONA_SERVER_ADMIN_KEY": ADMIN_KEY},
        )
        return result.exit_code, result.output

    code, output = run()
    assert code == 1 and output.startswith("error: 409: ") and "'rudder'" in output
    renamed = run("--target-name", "rudder-mapped")
    assert renamed == (0, f"stored rudder-mapped for {QWEN}: version 1, blocks [1]\n")
    assert run("--replace") == (0, f"stored rudder for {QWEN}: version {native['version'] + 1}, blocks [1]\n")


def test_a_gguf_model_reads_its_block_outputs_for_a_fit(server: ServerProcess) -> None:
    # The GGUF copy of the tiny Llama reads block outputs through llama.cpp's evaluation callback.
    started = fit(server, source_model=GGUF, target_model=QWEN, layers={"1": 1}, folds=3)
    # One read per corpus text through the callback: minutes when the 2 cores are shared.
    job = finished_job(server.url, started.json()["status_url"], ADMIN, timeout=480)
    assert job["status"] == "succeeded", job
    assert upload(server.url, "from-gguf", GGUF, {1: random_vector(64, 3)}).status_code == 200
    assert (
        mapped(server, "from-gguf", source_model=GGUF, target_model=QWEN)["provenance"]["source_model"]
        == GGUF
    )
