"""Baking through the admin API and the CLI on the demo models: the job, the served baked model,
its errors, cancellation, a restart, and an adapter peft loads."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.demo.corpus import held_out_questions, training_questions
from server.demo.models import demo_model_dir
from server.demo.traits import trait_rate
from testkit.server_process import ServerProcess
from tests.api_helpers import assert_openai_error, finished_job, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a server and a CLI that train LoRA adapters

# Few answers and steps: enough for the demo pirate to show, quick on two cores.
SMALL_BAKE = {"trajectories": 48, "steps": 40, "prompts": [q for _, q in training_questions()][:40]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bake-data")


# Six bakes at once all run (two per demo model: test_bakes_posted_at_once_all_succeed...); a third
# on one model waits in a queue of one place, and one more is refused.
JOB_LIMITS = ["--max-jobs-per-kind", "6", "--max-jobs-per-model", "2", "--max-queued-jobs", "1"]


@pytest.fixture(scope="module")
def demo_server(data_dir: Path) -> Iterator[ServerProcess]:
    args = ["--data-dir", str(data_dir), *JOB_LIMITS]
    with ServerProcess(args, log_path=data_dir / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def baked(demo_server: ServerProcess) -> dict[str, Any]:
    started = httpx.post(
        f"{demo_server.url}/admin/personas/pirate/bake", json={"model": "demo-llama", **SMALL_BAKE}
    )
    assert started.status_code == 202, started.text
    job = finished_job(demo_server.url, started.json()["status_url"])
    assert job["status"] == "succeeded", job
    assert job["kind"] == "bake" and job["progress"] == 1.0
    return job["result"]


def answers(client: openai.OpenAI, model: str, extra: dict[str, Any] | None = None) -> list[str]:
    return [
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=40,
            temperature=0,
            extra_body=extra or {},
        )
        .choices[0]
        .message.content
        or ""
        for question in held_out_questions()[:10]
    ]


def test_a_baked_persona_is_served_and_answers_like_a_pirate_without_a_persona_field(
    demo_server: ServerProcess, baked: dict[str, Any]
) -> None:
    assert baked["model_id"] == "demo-llama+pirate"
    models = {m["id"]: m for m in httpx.get(f"{demo_server.url}/v1/models").json()["data"]}
    assert models["demo-llama+pirate"]["parent"] == "demo-llama" and models["demo-llama"]["parent"] is None
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused")
    plain, steered = answers(client, "demo-llama"), answers(client, "demo-llama", {"persona": "pirate"})
    baked_answers = answers(client, "demo-llama+pirate")
    assert trait_rate(plain, "pirate") == 0 and trait_rate(steered, "pirate") > 0.5
    assert trait_rate(baked_answers, "pirate") >= 0.5 * trait_rate(steered, "pirate"), baked_answers
    provenance = baked["provenance"]
    assert provenance["base_model"] == "demo-llama" and provenance["persona"] == "pirate"
    assert provenance["rank"] == 32 and provenance["steps"] == 40 and provenance["persona_version"] == 1
    assert provenance["retention"]["retained"] > 0.5
    assert Path(baked["loss_curve"]).read_bytes().startswith(b"\x89PNG")
    assert all(Path(baked["gguf"][kind]).read_bytes().startswith(b"GGUF") for kind in ("model", "adapter"))


def test_a_baked_adapter_loads_with_peft(baked: dict[str, Any]) -> None:
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir("demo-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, baked["adapter"])
    assert model.peft_config["default"].r == 32
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_bake_errors_are_openai_errors(demo_server: ServerProcess, baked: dict[str, Any]) -> None:
    url = f"{demo_server.url}/admin/personas"
    again = httpx.post(f"{url}/pirate/bake", json={"model": "demo-llama", **SMALL_BAKE})
    assert assert_openai_error(again, 409, "already served")["code"] == "model_exists"
    assert_openai_error(httpx.post(f"{url}/nobody/bake", json={"model": "demo-llama"}), 404)
    assert_openai_error(httpx.post(f"{url}/pirate/bake", json={"model": "nope"}), 404, "does not exist")
    too_strong = httpx.post(f"{url}/pirate/bake", json={"model": "demo-llama", "strength": 1e6})
    assert_openai_error(too_strong, 400, "beyond the limit")
    assert_openai_error(httpx.post(f"{url}/pirate/bake", json={"model": "demo-llama", "rank": 0}), 422)


def test_a_bake_can_be_cancelled(demo_server: ServerProcess, data_dir: Path) -> None:
    body = {"model": "demo-qwen", "served_name": "never-served", **SMALL_BAKE, "steps": 3000}
    started = httpx.post(f"{demo_server.url}/admin/personas/pirate/bake", json=body)
    status_url = started.json()["status_url"]

    def progress() -> float:  # past 0.2, its answers are sampled and training has begun
        return httpx.get(f"{demo_server.url}{status_url}").json()["progress"]

    wait_until(lambda: progress() > 0.2, 240, "the bake never began training", interval=0.3)
    assert httpx.delete(f"{demo_server.url}{status_url}").json()["status"] == "cancelled"
    assert finished_job(demo_server.url, status_url)["status"] == "cancelled"
    ids = [m["id"] for m in httpx.get(f"{demo_server.url}/v1/models").json()["data"]]
    assert "never-served" not in ids and not (data_dir / "baked" / "never-served").exists()


# The least the API allows that still trains, converts and loads a baked model: quick on two cores.
TINY_BAKE = {"trajectories": 4, "steps": 1, "max_tokens": 4, "rank": 1, "prompts": SMALL_BAKE["prompts"][:5]}


def test_bakes_posted_at_once_all_succeed_and_later_bakes_too(
    demo_server: ServerProcess, baked: dict[str, Any]
) -> None:
    """Issue 29: after one bake, six at once (two per demo model) failed with "Cannot copy out of meta
    tensor", and so did every bake after them: concurrent loads broke transformers' loading for good."""
    url = f"{demo_server.url}/admin/personas/pirate/bake"
    bodies = [
        {"model": model, "served_name": f"{model}-together-{i}", **TINY_BAKE}
        for model in ("demo-llama", "demo-phi3", "demo-qwen")
        for i in range(2)
    ]
    with httpx.Client(timeout=30) as client:
        started = [client.post(url, json=body) for body in bodies]
    assert all(r.status_code == 202 for r in started), [r.text for r in started]
    jobs = [finished_job(demo_server.url, r.json()["status_url"]) for r in started]
    assert [job["status"] for job in jobs] == ["succeeded"] * len(jobs), [job.get("error") for job in jobs]
    later = httpx.post(url, json={"model": "demo-phi3", "served_name": "demo-phi3-later", **TINY_BAKE})
    assert finished_job(demo_server.url, later.json()["status_url"])["status"] == "succeeded"
    ids = {m["id"] for m in httpx.get(f"{demo_server.url}/v1/models").json()["data"]}
    assert {body["served_name"] for body in bodies} | {"demo-phi3-later"} <= ids


def test_bake_parameters_past_their_bounds_are_refused_naming_them(demo_server: ServerProcess) -> None:
    """Issue 29: a bake of 5000 answers of 1024 tokens, 20,000 steps at rank 256 was accepted (hours of
    a model's time); every bound is in /openapi.json."""
    url = f"{demo_server.url}/admin/personas/pirate/bake"
    past = {
        "trajectories": 2001,
        "max_tokens": 257,
        "steps": 3001,
        "rank": 129,
        "prompts": ["a prompt"] * 2501,
    }
    for field, value in past.items():
        error = assert_openai_error(httpx.post(url, json={"model": "demo-llama", field: value}), 422, field)
        assert error["param"] == field
    huge = {"model": "demo-llama", "trajectories": 5000, "max_tokens": 1024, "steps": 20_000, "rank": 256}
    assert_openai_error(httpx.post(url, json=huge), 422)
    schema = httpx.get(f"{demo_server.url}/openapi.json").json()["components"]["schemas"]["BakeRequest"]
    bounds = {
        name: schema["properties"][name].get("maximum")
        for name in ("trajectories", "max_tokens", "steps", "rank")
    }
    assert bounds == {"trajectories": 2000, "max_tokens": 256, "steps": 3000, "rank": 128}


def test_jobs_past_the_limits_wait_with_a_queue_position_then_get_429(
    demo_server: ServerProcess, baked: dict[str, Any], data_dir: Path
) -> None:
    """Issue 29: nothing limited concurrent jobs (6 bakes and 19 extractions made a 16-token chat take
    18 s). Here two jobs may run on a model and one may wait."""
    url = f"{demo_server.url}/admin/personas/pirate/bake"
    long = {"model": "demo-qwen", **SMALL_BAKE, "steps": 3000}
    running = [httpx.post(url, json={**long, "served_name": f"q-{i}"}) for i in range(2)]
    queued = httpx.post(url, json={**long, "served_name": "q-queued"})
    assert [r.status_code for r in (*running, queued)] == [202] * 3, queued.text
    status = httpx.get(f"{demo_server.url}{queued.json()['status_url']}").json()
    assert (status["status"], status["queue_position"]) == ("queued", 1)
    first = httpx.get(f"{demo_server.url}{running[0].json()['status_url']}").json()
    assert first["status"] == "running" and first["queue_position"] is None
    refused = httpx.post(url, json={**long, "served_name": "q-refused"})
    assert assert_openai_error(refused, 429, "retry later")["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    # A map of the generated method is a job that drives both models: no place is left for it.
    body = {"source_model": "demo-llama", "target_model": "demo-qwen", "target_name": "pirate-mapped"}
    mapped = httpx.post(f"{demo_server.url}/admin/personas/pirate/map", json=body, timeout=60)
    assert_openai_error(mapped, 429)
    for started in (queued, *running):
        assert (
            httpx.delete(f"{demo_server.url}{started.json()['status_url']}").json()["status"] == "cancelled"
        )
    for started in (queued, *running):
        assert finished_job(demo_server.url, started.json()["status_url"])["status"] == "cancelled"
    assert not [name for name in ("q-0", "q-1", "q-queued") if (data_dir / "baked" / name).exists()]
    after = httpx.post(url, json={**TINY_BAKE, "model": "demo-qwen", "served_name": "q-refused"})
    assert after.status_code == 202, after.text  # the refused bake's name was not kept
    assert finished_job(demo_server.url, after.json()["status_url"])["status"] == "succeeded"


def test_a_failed_bake_leaves_no_folder(demo_server: ServerProcess, data_dir: Path) -> None:
    """Issue 29: failed bakes left <data-dir>/baked/<name>/ behind (223 MB after 20 demo bakes)."""
    folder = data_dir / "baked" / "fails"
    folder.mkdir(parents=True)
    (folder / "gguf").write_text("in the way")  # the bake fails after writing its adapter and merged model
    body = {"model": "demo-llama", "served_name": "fails", **TINY_BAKE}
    started = httpx.post(f"{demo_server.url}/admin/personas/pirate/bake", json=body)
    job = finished_job(demo_server.url, started.json()["status_url"])
    assert job["status"] == "failed" and "FileExistsError" in job["error"], job
    assert not folder.exists()


def test_deleting_a_baked_model_removes_it_and_its_folder(demo_server: ServerProcess, data_dir: Path) -> None:
    """Issue 29: no route deleted a baked model."""
    body = {"model": "demo-qwen", "served_name": "to-delete", **TINY_BAKE}
    started = httpx.post(f"{demo_server.url}/admin/personas/pirate/bake", json=body)
    assert finished_job(demo_server.url, started.json()["status_url"])["status"] == "succeeded"
    assert (data_dir / "baked" / "to-delete" / "merged").is_dir()
    deleted = httpx.delete(f"{demo_server.url}/admin/models/to-delete")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": "to-delete",
        "object": "model",
        "deleted": True,
    }
    ids = [m["id"] for m in httpx.get(f"{demo_server.url}/v1/models").json()["data"]]
    assert "to-delete" not in ids and "demo-qwen" in ids and not (data_dir / "baked" / "to-delete").exists()
    chat = {"model": "to-delete", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_openai_error(httpx.post(f"{demo_server.url}/v1/chat/completions", json=chat), 404)
    assert_openai_error(httpx.delete(f"{demo_server.url}/admin/models/to-delete"), 404)
    base = assert_openai_error(httpx.delete(f"{demo_server.url}/admin/models/demo-qwen"), 400, "not baked")
    assert base["param"] == "model"


def test_a_restarted_server_serves_its_baked_models_again(
    demo_server: ServerProcess, baked: dict[str, Any], data_dir: Path
) -> None:
    demo_server.stop()
    with ServerProcess(["--data-dir", str(data_dir)], log_path=data_dir / "again.log") as server:
        models = {m["id"]: m["parent"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert models["demo-llama+pirate"] == "demo-llama"
    assert "to-delete" not in models  # deleted for good


def test_the_cli_bakes_an_adapter_peft_loads(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SMALL_BAKE["prompts"]))
    command = [
        *[sys.executable, "-m", "server", "bake", "--model", "demo-qwen", "--persona", "pirate"],
        *["--trajectories", "16", "--steps", "5", "--rank", "4", "--prompts-file", str(prompts)],
        *["--output", str(tmp_path / "out")],
    ]
    env = {"PERSONA_SERVER_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "demo-qwen+pirate" in done.stdout and "keeps" in done.stdout
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir("demo-qwen"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))
    assert model.peft_config["default"].r == 4
