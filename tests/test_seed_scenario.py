"""The scenario the project grew from (issue 31, item 5; docs/seed-scenario.md), end to end through a
real server and the openai client: a persona extracted on a Qwen2.5-shaped model (demo-qwen, HF
engine) is carried with the map endpoint's defaults to a GPT-OSS-shaped model served as GGUF through
llama.cpp (demo-gpt-oss: four experts, sliding and full layers in turn, attention sinks, YaRN), and
steers it per request. Both models are trained demo models, so the question whether the carried
persona moves the target the persona's way has an answer: the target's own reading of the persona
(its native pirate vector, which the map never sees, reading the answers the server wrote) and the
pirate marker words both rise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from statistics import mean
from typing import Any

import httpx
import openai
import pytest

from server.demo.corpus import held_out_questions
from server.demo.models import demo_model_dir
from server.demo.traits import trait_rate
from server.gguf.model import convert_hf_to_gguf
from testkit.server_process import ServerProcess
from tests.api_helpers import finished_job

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp, pytest.mark.slow]

SOURCE, TARGET, TARGET_HF = "demo-qwen", "demo-gpt-oss-gguf", "demo-gpt-oss"
QUESTIONS = held_out_questions()  # questions neither model trained on


def shipped_persona(model: str, name: str) -> dict[str, Any]:
    """A demo model's persona as the demo build extracted and calibrated it (its vectors only)."""
    entry = json.loads((demo_model_dir(model) / "personas.json").read_text())[name]
    keys = ("layers", "default_strength", "default_positions")
    return {key: entry[key] for key in keys}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("seed-scenario")
    gguf = convert_hf_to_gguf(demo_model_dir(TARGET_HF), folder / f"{TARGET}.gguf")
    args = [
        *["--model", str(demo_model_dir(SOURCE)), "--served-model-name", SOURCE],
        *["--model", str(gguf), "--served-model-name", TARGET],
        *["--model", str(demo_model_dir(TARGET_HF)), "--served-model-name", TARGET_HF],
        *["--gguf-kv-type", "f32", "--gguf-contexts", "2"],
    ]
    with ServerProcess(
        args, env={"PERSONA_SERVER_DATA_DIR": str(folder)}, log_path=folder / "log"
    ) as process:
        yield process


@pytest.fixture(scope="module")
def mapped(server: ServerProcess) -> dict[str, Any]:
    """demo-qwen's pirate, uploaded by its vectors, carried to the GGUF GPT-OSS by the map endpoint's
    defaults (the generated method); the target's own pirate uploaded as pirate-native, the judge."""
    uploads = [("pirate", SOURCE, shipped_persona(SOURCE, "pirate"))]
    native = shipped_persona(TARGET_HF, "pirate")
    uploads += [("pirate-native", model, native) for model in (TARGET, TARGET_HF)]
    for name, model, fields in uploads:
        answer = httpx.put(f"{server.url}/admin/personas/{name}", json={"model": model, **fields}, timeout=30)
        assert answer.status_code in (200, 201), answer.text
    started = httpx.post(
        f"{server.url}/admin/personas/pirate/map",
        json={"source_model": SOURCE, "target_model": TARGET},
        timeout=30,
    )
    assert started.status_code == 202, started.text
    job = finished_job(server.url, started.json()["status_url"], timeout=900)
    assert job["status"] == "succeeded", job
    return job["result"]["persona"]


def ask(client: openai.OpenAI, model: str, question: str, **persona: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
        temperature=0,
        extra_body=persona,
    )


def test_the_carried_persona_moves_the_gguf_gpt_oss_the_personas_way(
    server: ServerProcess, mapped: dict[str, Any]
) -> None:
    """Per request through the openai client: answers steered by the carried pirate read more pirate
    to the target's own native vector, and carry more pirate marker words, than its unsteered answers
    to the same held-out questions."""
    assert mapped["model"] == TARGET and mapped["provenance"]["method"] == "generated"
    assert mapped["provenance"]["source_model"] == SOURCE and min(int(b) for b in mapped["layers"]) >= 1
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    readings: dict[str, list[float]] = {"plain": [], "carried": []}
    answers: dict[str, list[str]] = {"plain": [], "carried": []}
    for question in QUESTIONS:
        for kind, persona in (("plain", {}), ("carried", {"persona": "pirate"})):
            response = ask(client, TARGET, question, persona_monitor=["pirate-native"], **persona)
            readings[kind].append(response.model_extra["persona_scores"]["pirate-native"])
            answers[kind].append(response.choices[0].message.content)
    figures = {kind: (mean(readings[kind]), trait_rate(answers[kind], "pirate")) for kind in readings}
    print(f"native reading, marker rate over {len(QUESTIONS)} questions: {figures}")
    print(f"{QUESTIONS[0]!r}: unsteered {answers['plain'][0]!r}, carried pirate {answers['carried'][0]!r}")
    assert figures["carried"][0] > figures["plain"][0], figures
    assert figures["carried"][1] > figures["plain"][1], figures


def test_the_carried_vector_answers_alike_on_llama_cpp_and_the_hf_engine(
    server: ServerProcess, mapped: dict[str, Any]
) -> None:
    """The same GPT-OSS weights on both engines, steered by the very vectors the map stored."""
    stored = httpx.get(f"{server.url}/admin/personas/pirate", params={"model": TARGET}).json()
    fields = {key: stored[key] for key in ("layers", "default_strength", "default_positions")}
    uploaded = httpx.put(f"{server.url}/admin/personas/pirate", json={"model": TARGET_HF, **fields})
    assert uploaded.status_code in (200, 201), uploaded.text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for question in QUESTIONS[:4]:
        on_gguf = ask(client, TARGET, question, persona="pirate")
        on_hf = ask(client, TARGET_HF, question, persona="pirate")
        assert on_gguf.choices[0].message.content == on_hf.choices[0].message.content, question
