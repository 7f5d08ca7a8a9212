"""A dead engine is reported and comes back by itself (serving/engine_supervisor.py; issue 29).

The server runs in this process (real uvicorn on a loopback port, driven by the openai client), so
that a fault can be put into a running engine: an HF runner whose every forward fails (as after a
CUDA device assert) and a llama.cpp lane whose decode kills the scheduler thread. The vLLM engine's
worker is killed by PID in tests/test_api_vllm.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.settings import Settings
from testkit.server_process import free_port
from tests.api_helpers import chat, metric, running_stream, wait_until

# Engines killed and restarted.
pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp, pytest.mark.slow]

HF, GGUF = "hf-llama", "gguf-llama"


class LaneKilled(BaseException):
    """Not an Exception: it ends the scheduler thread as a crash in native code would end a lane."""


def killed(*_args: object, **_kwargs: object) -> None:
    raise LaneKilled


def kill_lanes(engine: Any) -> None:
    """Every lane of a llama.cpp engine ends its scheduler thread at its next decode."""
    for state in engine.scheduler._states:
        state.lane._decode = killed


class InProcessServer:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self._thread.start()
        wait_until(lambda: self.ready().status_code == 200, 120, "the server never became ready")
        return self

    def ready(self) -> httpx.Response:
        try:
            return httpx.get(f"{self.url}/ready", timeout=5)
        except httpx.HTTPError:
            return httpx.Response(599)

    def engine(self, model: str) -> Any:
        return self.app.state.services.registry.engine(model)

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


@pytest.fixture(scope="module")
def server(
    llama_dir: Path, llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    settings = Settings(
        model=[str(llama_dir), str(llama_gguf)],
        served_model_name=[HF, GGUF],
        data_dir=tmp_path_factory.mktemp("restart-data"),
        gguf_kv_type="f32",
        gguf_contexts=1,
        default_max_tokens=8,
        engine_restart_delay=3.0,  # time to see an engine down before it is back
    )
    with InProcessServer(create_app(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def answer(client: openai.OpenAI, model: str, max_tokens: int = 8) -> str:
    return chat(client, model, max_tokens=max_tokens, ignore_eos=False).choices[0].message.content or ""


def assert_ends_with_engine_error(stream: Any) -> None:
    """The stream ends with an error event naming the engine, neither hanging nor breaking off."""
    with pytest.raises(openai.APIError) as raised:
        for _ in stream:
            pass
    assert "engine" in str(raised.value)


def assert_comes_back(server: InProcessServer, model: str, old: Any) -> None:
    """/ready names the model while it is down, then answers 200 with a new engine serving it."""

    def named_down() -> bool:
        down = server.ready()
        return down.status_code == 503 and model in down.json()["engines_down"]

    # An order, not a time: /ready names it down (the supervisor polls every 0.5 s) before it is back
    # (the restart waits 3 s). Were it back first, /ready would never name it and this would fail.
    wait_until(named_down, 60, f"/ready did not name {model} before it came back")
    wait_until(lambda: server.ready().status_code == 200, 120, f"{model} never came back")
    assert server.engine(model) is not old
    assert metric(server.url, "persona_server_engine_restarts_total", model=model) >= 1


def test_an_hf_engine_whose_steps_keep_failing_is_restarted(
    server: InProcessServer, client: openai.OpenAI
) -> None:
    before = answer(client, HF)
    engine = server.engine(HF)
    stream = running_stream(client, HF)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    engine._runner._forward = broken  # this engine's runner only: a reload builds a new one
    assert_ends_with_engine_error(stream)
    # Each request fails as the engine's fault (503, never 500) until its steps have failed enough
    # times in a row to call it dead; from then on 503 says it is restarting.
    codes = set()
    while server.app.state.services.registry.down.get(HF) is None:
        with pytest.raises(openai.APIStatusError) as raised:
            answer(client, HF)
        assert raised.value.status_code == 503
        assert raised.value.response.headers["Retry-After"]
        codes.add(raised.value.body["code"])  # type: ignore[index]
    assert codes <= {"engine_error", "engine_restarting"}
    assert metric(server.url, "persona_server_engine_deaths_total", model=HF) == 1
    assert answer(client, GGUF)  # the other model serves on
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert_comes_back(server, HF, engine)
    assert answer(client, HF) == before


def test_a_llama_cpp_engine_whose_lane_dies_is_restarted(
    server: InProcessServer, client: openai.OpenAI
) -> None:
    before = answer(client, GGUF)
    engine = server.engine(GGUF)
    stream = running_stream(client, GGUF)

    kill_lanes(engine)
    assert_ends_with_engine_error(stream)
    with pytest.raises(openai.APIStatusError) as raised:
        answer(client, GGUF)
    assert (raised.value.status_code, raised.value.body["code"]) == (503, "engine_restarting")  # type: ignore[index]
    assert_comes_back(server, GGUF, engine)
    assert answer(client, GGUF) == before


def test_health_fails_only_while_no_engine_can_serve(server: InProcessServer, client: openai.OpenAI) -> None:
    engines = {model: server.engine(model) for model in (HF, GGUF)}

    kill_lanes(engines[GGUF])
    engines[HF].scheduler._step = killed  # the HF engine's thread ends too
    for model in engines:
        with pytest.raises(openai.APIStatusError):
            answer(client, model)
    wait_until(lambda: len(server.app.state.services.registry.down) == 2, 10, "the deaths were not noticed")
    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 503 and set(health.json()["engines_down"]) == {HF, GGUF}
    wait_until(lambda: server.ready().status_code == 200, 120, "the engines never came back")
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert all(answer(client, model) for model in engines)
