"""The bundled demo models: personas that measurably steer, extraction, and `serve` with no model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.demo.corpus import POLES, held_out_questions, training_questions
from server.demo.models import DEMO_MODEL_NAMES, SCENARIO_MODEL_NAMES, demo_model_dir
from server.demo.train import DEMO_SPECS
from server.demo.traits import shows_trait
from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.evaluation.persona_table import PersonaVerdict, evaluate_demo_model, format_table
from testkit.server_process import ServerProcess
from tests.api_helpers import assert_openai_error, finished_job


def test_every_demo_model_built_is_shipped_and_served() -> None:
    assert tuple(DEMO_SPECS) == DEMO_MODEL_NAMES + SCENARIO_MODEL_NAMES
    for name in DEMO_SPECS:
        assert (demo_model_dir(name) / "model.safetensors").is_file()
        assert (demo_model_dir(name) / "personas.json").is_file()


@pytest.fixture(scope="module", params=DEMO_MODEL_NAMES)
def verdicts(request: pytest.FixtureRequest) -> list[PersonaVerdict]:
    async def evaluate() -> list[PersonaVerdict]:
        backend = HFBackend.load(demo_model_dir(request.param), model_id=request.param)
        try:
            return await evaluate_demo_model(backend, request.param, samples=4)
        finally:
            await backend.close()

    return asyncio.run(evaluate())


# Targets the shipped personas are known to miss, and why; any other miss fails.
# demo-phi3 formal (block 0, strength 8): at -8 the held-out formal score stays at its unsteered 0.054
# (6 of 112 answers both times), so -s does not lower it; +s meets its target (0.295 >= 0.25).
KNOWN_MISSES = {("demo-phi3", "formal", "lowered")}


# In process, but the whole demo evaluation of every model: minutes on CPU, not for the quick loop.
@pytest.mark.slow
def test_each_persona_shifts_its_trait_and_stays_fluent(verdicts: list[PersonaVerdict]) -> None:
    table = format_table(verdicts)
    assert {v.persona for v in verdicts} == {"pirate", "formal", "silly"}
    checks = ("raised", "lowered", "fluent")
    misses = {(v.model, v.persona, check) for v in verdicts for check in checks if not getattr(v, check)}
    assert misses <= KNOWN_MISSES, table
    if misses:
        pytest.xfail(f"known misses {sorted(misses)}\n{table}")


async def test_unsteered_demo_models_answer_held_out_questions_coherently() -> None:
    for name in DEMO_MODEL_NAMES:
        backend = HFBackend.load(demo_model_dir(name), model_id=name)
        try:
            question = held_out_questions()[0]  # "Tell me about apples." is never trained on
            request = GenerationRequest(
                messages=[ChatMessage("user", question)],
                sampling=SamplingParams(max_tokens=40, temperature=0),
            )
            answer = "".join([chunk.text async for chunk in backend.generate(request)])
        finally:
            await backend.close()
        assert "pples" in answer and answer.endswith("."), answer
        assert not any(shows_trait(answer, persona) for persona in ("pirate", "formal", "silly")), answer


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    data = tmp_path_factory.mktemp("demo-data")
    with ServerProcess(["--data-dir", str(data)], log_path=data / "server.log") as server:
        server.data_dir = data  # type: ignore[attr-defined]
        yield server


@pytest.mark.integration  # the demo server
def test_serve_without_a_model_serves_the_demos_with_their_personas(demo_server: ServerProcess) -> None:
    models = httpx.get(f"{demo_server.url}/v1/models").json()["data"]
    expected = [("demo-llama", 128), ("demo-qwen", 96), ("demo-phi3", 192)]
    assert [(m["id"], m["hidden_size"]) for m in models] == expected
    for model in DEMO_MODEL_NAMES:
        listing = httpx.get(f"{demo_server.url}/v1/personas", params={"model": model}).json()["data"]
        assert {p["name"] for p in listing} == {"pirate", "formal", "silly"}
        assert all(p["provenance"]["kind"] == "extracted" for p in listing)


@pytest.mark.integration  # the demo server
def test_the_readme_snippet_gives_a_visibly_steered_answer(demo_server: ServerProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused")
    question = [{"role": "user", "content": "Tell me about the sea."}]
    plain = client.chat.completions.create(
        model="demo-llama", messages=question, max_tokens=48, temperature=0
    )
    pirate = client.chat.completions.create(
        model="demo-llama", messages=question, max_tokens=48, temperature=0, extra_body={"persona": "pirate"}
    )
    assert not shows_trait(plain.choices[0].message.content, "pirate"), plain.choices[0].message.content
    assert shows_trait(pirate.choices[0].message.content, "pirate"), pirate.choices[0].message.content


@pytest.mark.integration  # the demo server
def test_extraction_job_stores_a_persona(demo_server: ServerProcess) -> None:
    body = {
        "model": "demo-qwen",
        "positive_prompts": list(POLES["silly"].system_prompts),
        "negative_prompts": list(POLES["serious"].system_prompts),
        "questions": [question for _, question in training_questions()[:12]],
        "layers": None,
        "samples_per_question": 1,
        "default_strength": 2.0,
    }
    accepted = httpx.post(f"{demo_server.url}/admin/personas/goofy/extract", json=body)
    assert accepted.status_code == 202, accepted.text
    status_url = accepted.json()["status_url"]
    assert status_url == f"/admin/jobs/{accepted.json()['id']}"

    def seen(job: dict[str, Any]) -> None:
        assert job["status"] in ("queued", "running", "succeeded"), job
        assert 0.0 <= job["progress"] <= 1.0

    job = finished_job(demo_server.url, status_url, timeout=120, seen=seen)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    result = job["result"]
    assert len(result["layers"]) == 4 and result["answers_used"] == {"positive": 12, "negative": 12}
    # 24 answers split by the midpoint of the two means: chance is 0.5; the demo-qwen separates
    # 23 of 24 (0.958) at every block, so 0.85 (at most 3 misses) leaves room and still means something.
    assert all(entry["norm"] > 0 and entry["accuracy"] >= 0.85 for entry in result["layers"]), result
    stored = httpx.get(f"{demo_server.url}/admin/personas/goofy", params={"model": "demo-qwen"}).json()
    assert list(stored["layers"]) == [str(result["recommended_layer"])]
    assert stored["provenance"]["kind"] == "extracted" and stored["default_strength"] == 2.0
    assert len(stored["layers"][str(result["recommended_layer"])]) == 96


@pytest.mark.integration  # the demo server
def test_extraction_requests_are_validated(demo_server: ServerProcess) -> None:
    base = {"model": "demo-llama", "positive_prompts": ["a"], "negative_prompts": ["b"], "questions": ["q?"]}
    url = f"{demo_server.url}/admin/personas/x/extract"
    assert_openai_error(httpx.post(url, json={**base, "model": "nope"}), 404)
    assert_openai_error(httpx.post(url, json={**base, "layers": [9]}), 422, "layer 9")
    assert_openai_error(httpx.post(url, json={**base, "questions": []}), 422)
    assert_openai_error(httpx.post(f"{demo_server.url}/admin/personas/bad name/extract", json=base), 422)
    assert_openai_error(httpx.get(f"{demo_server.url}/admin/jobs/job-unknown"), 404, "job-unknown")


@pytest.mark.integration  # starts its own server process, twice: about 20 s
@pytest.mark.slow
def test_operator_edits_survive_the_demo_seeding(tmp_path: Path) -> None:
    with ServerProcess(["--data-dir", str(tmp_path)], log_path=tmp_path / "first.log") as server:
        deleted = httpx.delete(f"{server.url}/admin/personas/formal", params={"model": "demo-llama"})
        assert deleted.status_code == 204
        edited = httpx.get(f"{server.url}/admin/personas/pirate", params={"model": "demo-llama"}).json()
        edited_body = {"model": "demo-llama", "layers": edited["layers"], "default_strength": 1.5}
        assert httpx.put(f"{server.url}/admin/personas/pirate", json=edited_body).status_code == 200
    with ServerProcess(["--data-dir", str(tmp_path)], log_path=tmp_path / "second.log") as server:
        names = {
            p["name"]
            for p in httpx.get(f"{server.url}/v1/personas", params={"model": "demo-llama"}).json()["data"]
        }
        assert names == {"pirate", "silly"}
        pirate = httpx.get(f"{server.url}/admin/personas/pirate", params={"model": "demo-llama"}).json()
        assert pirate["default_strength"] == 1.5 and pirate["version"] == 2


@pytest.mark.integration  # runs the CLI in a subprocess: about 15 s
@pytest.mark.slow
def test_extract_command_writes_an_uploadable_persona(tmp_path: Path) -> None:
    output = tmp_path / "pirate.json"
    command = [
        *[sys.executable, "-m", "server", "extract", "--model", str(demo_model_dir("demo-llama"))],
        *["--name", "pirate2", "--positive", "You are a pirate.", "--negative", "You speak plainly."],
        *["--question", "Tell me about the moon.", "--question", "Explain snow to me."],
        *["--output", str(output), "--store", f"sqlite:///{tmp_path / 'store.sqlite3'}"],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "recommended block" in result.stdout and "stored pirate2 for demo-llama, version 1" in result.stdout
    )
    body = json.loads(output.read_text())
    assert body["model"] == "demo-llama" and all(len(v) == 128 for v in body["layers"].values())


@pytest.mark.integration  # the demo server
def test_monitoring_scores_separate_steered_from_unsteered_answers(demo_server: ServerProcess) -> None:
    import openai

    from tests.api_helpers import metric

    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused")
    questions = [question for _, question in training_questions()[:6]]

    def score(question: str, **steering: Any) -> float:
        answer = client.chat.completions.create(
            model="demo-llama",
            messages=[{"role": "user", "content": question}],
            max_tokens=32,
            temperature=0,
            extra_body={"persona_monitor": ["pirate", "formal"], **steering},
        )
        scores = answer.model_extra["persona_scores"]
        assert set(scores) == {"pirate", "formal"}
        return scores["pirate"]

    steered = [score(q, persona="pirate") for q in questions]
    plain = [score(q) for q in questions]
    assert min(steered) > max(plain), (steered, plain)
    assert (
        metric(demo_server.url, "persona_server_persona_score_count", model="demo-llama", persona="pirate")
        >= 12
    )

    stream = client.chat.completions.create(
        model="demo-llama",
        messages=[{"role": "user", "content": questions[0]}],
        max_tokens=32,
        temperature=0,
        stream=True,
        extra_body={"persona_monitor": ["pirate"], "persona": "pirate"},
    )
    chunks = list(stream)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals[0].model_extra["persona_scores"]["pirate"] == pytest.approx(steered[0], rel=1e-4)
    assert all("persona_scores" not in c.model_extra for c in chunks if c not in finals)
    missing = httpx.post(
        f"{demo_server.url}/v1/chat/completions",
        json={
            "model": "demo-llama",
            "messages": [{"role": "user", "content": "hi"}],
            "persona_monitor": ["ghost"],
        },
    )
    assert missing.status_code == 404 and "ghost" in missing.json()["error"]["message"]
