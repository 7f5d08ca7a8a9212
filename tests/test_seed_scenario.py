"""The scenario the project grew from (issue 31, item 5), end to end through a real server and the
openai client: a persona extracted on a Qwen2.5-shaped model (HF engine) is carried with the default
mapping method to a GPT-OSS-shaped model served as GGUF through llama.cpp, and steers it per request.
The models are tiny and random (testkit/tiny_models.py): a Qwen2 of hidden 64, a GPT-OSS of hidden
64 with four experts, sliding-window layers and attention sinks, written to GGUF by
server/gguf/model.py and also served by the HF engine from the same weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.gguf.model import convert_hf_to_gguf
from testkit.server_process import ServerProcess
from tests.api_helpers import finished_job

pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp, pytest.mark.slow]

SOURCE, TARGET, TARGET_HF = "tiny-qwen25", "tiny-gpt-oss-gguf", "tiny-gpt-oss"
QUESTIONS = ["tell me about the sea", "where is the ship", "what is the weather today", "good morning friend"]
PIRATE = ["You are a pirate. Speak like one: arr, matey, ahoy.", "Answer as an old sea pirate would."]
PLAIN = ["You are a plain assistant. Answer plainly.", "Answer in a calm, ordinary way."]


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("seed-scenario")
    gguf = convert_hf_to_gguf(tiny_model_dir("gpt_oss"), folder / "tiny-gpt-oss.gguf")
    args = [
        *["--model", str(tiny_model_dir("qwen2")), "--served-model-name", SOURCE],
        *["--model", str(gguf), "--served-model-name", TARGET],
        *["--model", str(tiny_model_dir("gpt_oss")), "--served-model-name", TARGET_HF],
        *["--gguf-kv-type", "f32", "--gguf-contexts", "2", "--max-strength", "1000"],
    ]
    with ServerProcess(
        args, env={"PERSONA_SERVER_DATA_DIR": str(folder)}, log_path=folder / "log"
    ) as process:
        yield process


@pytest.fixture(scope="module")
def mapped(server: ServerProcess) -> dict[str, Any]:
    """pirate extracted on the Qwen2.5-shaped source, then carried to the GGUF GPT-OSS by the map
    endpoint's defaults (the generated method)."""
    body = {
        "model": SOURCE,
        "positive_prompts": PIRATE,
        "negative_prompts": PLAIN,
        "questions": QUESTIONS,
        "layers": [1, 2],  # llama.cpp steers from block 1: relative depths keep the target's >= 1
        "default_strength": 4.0,
    }
    accepted = httpx.post(f"{server.url}/admin/personas/pirate/extract", json=body, timeout=30)
    assert accepted.status_code == 202, accepted.text
    job = finished_job(server.url, accepted.json()["status_url"], timeout=300)
    assert job["status"] == "succeeded", job
    carried = httpx.post(
        f"{server.url}/admin/personas/pirate/map",
        json={"source_model": SOURCE, "target_model": TARGET},
        timeout=600,
    )
    assert carried.status_code == 201, carried.text
    return carried.json()


def ask(client: openai.OpenAI, model: str, question: str, **persona: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, **persona},
    )


def test_the_carried_persona_steers_the_gguf_gpt_oss_per_request(
    server: ServerProcess, mapped: dict[str, Any]
) -> None:
    """The map stored a persona on the GGUF model that llama.cpp can steer (blocks from 1), made by
    the generated method from the source's persona, with the target's calibration; a request naming
    it is steered and reports it, and its readings come back; one naming nothing is not steered.
    (Whether the reading moves the persona's way is a question for trained weights: on these random
    ones the calibration itself measures no transfer, and says so with predicted_transfer.)"""
    assert mapped["model"] == TARGET and mapped["provenance"]["method"] == "generated"
    assert mapped["provenance"]["source_model"] == SOURCE and min(int(b) for b in mapped["layers"]) >= 1
    calibration = mapped["provenance"]["strength_calibration"]
    assert len(calibration["steps"]) > 1 and 0.0 <= calibration["predicted_transfer"] <= 1.0
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    changed = 0
    for question in QUESTIONS:
        plain = ask(client, TARGET, question, persona_monitor=["pirate"])
        steered = ask(client, TARGET, question, persona="pirate", persona_monitor=["pirate"])
        assert steered.model_extra["persona"]["name"] == "pirate" and plain.model_extra["persona"] is None
        assert {type(r.model_extra["persona_scores"]["pirate"]) for r in (plain, steered)} == {float}
        changed += steered.choices[0].message.content != plain.choices[0].message.content
    assert changed > 0  # the carried persona steers the GGUF model


def test_the_carried_vector_answers_alike_on_llama_cpp_and_the_hf_engine(
    server: ServerProcess, mapped: dict[str, Any]
) -> None:
    """The same GPT-OSS weights on both engines, steered by the very vectors the map stored."""
    stored = httpx.get(f"{server.url}/admin/personas/pirate", params={"model": TARGET}).json()
    fields = {key: stored[key] for key in ("layers", "default_strength", "default_positions")}
    for model in (TARGET, TARGET_HF):
        uploaded = httpx.put(f"{server.url}/admin/personas/carried", json={"model": model, **fields})
        assert uploaded.status_code == 200, uploaded.text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    for question in QUESTIONS:
        on_gguf = ask(client, TARGET, question, persona="carried")
        on_hf = ask(client, TARGET_HF, question, persona="carried")
        assert on_gguf.choices[0].message.content == on_hf.choices[0].message.content, question
