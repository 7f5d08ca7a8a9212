"""Shared fixtures: tiny models built once per session, a real server, a real Redis.

Markers say what a test needs (pyproject.toml lists them): ``integration`` (it starts a process),
``llama_cpp``, ``vllm``, ``browser``, ``redis``; and ``slow`` (seconds or more: LoRA training,
llama.cpp conversions and loads, vLLM engines, a browser, soak runs), so that
``pytest -m "not slow"`` is the quick loop. Markers only select: a test whose need is missing
fails, it is never skipped. A test that uses a fixture below that needs something carries its
marker (a module says so in ``pytestmark``); collection fails on one that does not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from server.engine.hf.backend import HFBackend
from server.gguf.model import convert_hf_to_gguf
from testkit.server_process import ServerProcess
from testkit.tiny_models import build_tiny_model
from tests.api_helpers import ADMIN_KEY, API_KEY, GGUF, LLAMA, QWEN, random_vector, upload
from tests.redis_process import RedisProcess

# What a fixture needs, as markers: a test that uses it (directly or through another fixture) must
# carry them, so that deselecting a marker deselects every test that needs it.
FIXTURE_MARKERS = {
    "server": ("integration",),  # a server process (this one's llama_gguf adds llama_cpp)
    "demo_server": ("integration",),
    "keyed_server": ("integration",),
    "redis_server": ("integration", "redis"),
    "llama_gguf": ("llama_cpp",),
    "vllm_model_dir": ("vllm",),
    "browser": ("browser", "slow"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = []
    for item in items:
        carried = {mark.name for mark in item.iter_markers()}
        needed = {
            mark for name in getattr(item, "fixturenames", ()) for mark in FIXTURE_MARKERS.get(name, ())
        }
        if needed - carried:
            unmarked.append(f"{item.nodeid} needs {sorted(needed - carried)}")
    if unmarked:
        raise pytest.UsageError("tests without the markers of what they use:\n" + "\n".join(unmarked))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build (once per session) a tiny random model of an architecture; returns its directory."""
    built: dict[str, Path] = {}

    def build(architecture: str) -> Path:
        if architecture not in built:
            built[architecture] = build_tiny_model(tmp_path_factory.mktemp(architecture), architecture)
        return built[architecture]

    return build


# vLLM's CPU attention needs a head dimension of at least 32: 4 heads of 32.
VLLM_TINY_SIZES = {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
VLLM_TINY_SEEDS = {"llama": 11, "qwen2": 12, "phi3": 13, "mistral": 21, "mixtral": 22, "qwen3": 23}
VLLM_TINY_SEEDS |= {"qwen3_moe": 24, "gemma2": 26, "gemma3_text": 27, "olmo2": 25, "granite": 28}
VLLM_TINY_SEEDS |= {"gpt_oss": 29}


# vLLM keys its compile cache (~/.cache/vllm) by the model's path among other things: a tiny model
# rebuilt under a fresh temporary path each run is compiled again (about 17 of each engine start's
# 50 s here). The vLLM tests' models are therefore kept under a path named by everything that makes
# them (the builder's source, the library versions, the arguments), rebuilt whenever any of it changes.
TEST_MODEL_CACHE = Path(
    os.environ.get("PERSONA_SERVER_TEST_MODELS", Path.home() / ".cache" / "persona-server" / "test-models")
)


def _model_key(architecture: str, seed: int) -> str:
    import torch
    import transformers

    import testkit.tiny_models

    source = Path(testkit.tiny_models.__file__).read_bytes()
    facts = repr(
        (architecture, seed, sorted(VLLM_TINY_SIZES.items()), torch.__version__, transformers.__version__)
    )
    return hashlib.sha256(source + facts.encode()).hexdigest()[:16]


def cached_tiny_model(architecture: str, seed: int) -> Path:
    """The tiny model under its content-named path, built there (atomically) if absent."""
    directory = TEST_MODEL_CACHE / f"vllm-{architecture}-{_model_key(architecture, seed)}"
    if not (directory / "config.json").exists():
        TEST_MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=TEST_MODEL_CACHE, prefix=f".{architecture}-"))
        build_tiny_model(building, architecture, seed=seed, **VLLM_TINY_SIZES)
        try:
            building.rename(directory)
        except OSError:  # another run finished it first: theirs is the same model
            shutil.rmtree(building, ignore_errors=True)
    return directory


@pytest.fixture(scope="session")
def vllm_model_dir() -> Callable[[str], Path]:
    """A tiny model of an architecture that vLLM's CPU build can run (kept between runs)."""

    def build(architecture: str) -> Path:
        return cached_tiny_model(architecture, VLLM_TINY_SEEDS[architecture])

    return build


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llama_backend(llama_dir: Path) -> Iterator[HFBackend]:
    backend = HFBackend.load(llama_dir, model_id="tiny-llama", max_batch_size=32)
    yield backend
    backend.scheduler.stop()


@pytest.fixture(scope="session")
def llama_gguf(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's very weights as an F32 GGUF file, for llama.cpp."""
    return convert_hf_to_gguf(llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("qwen"), "qwen2", seed=3, hidden_size=48, num_heads=4)


@pytest.fixture(scope="session")
def server(
    llama_dir: Path, qwen_dir: Path, llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("api-data")
    args = [
        *["--model", str(llama_dir), "--model", str(qwen_dir), "--model", str(llama_gguf)],
        *["--served-model-name", LLAMA, "--served-model-name", QWEN, "--served-model-name", GGUF],
        *["--gguf-kv-type", "f32", "--gguf-contexts", "2", "--admin-key", ADMIN_KEY],
        *["--max-tokens-cap", "900", "--max-strength", "50", "--default-max-tokens", "16"],
        *["--max-body-bytes", "200000"],
    ]
    # The API key comes from the environment, as every flag can.
    with ServerProcess(
        args,
        env={"PERSONA_SERVER_API_KEY": API_KEY, "PERSONA_SERVER_DATA_DIR": str(data)},
        log_path=data / "server.log",
    ) as process:
        yield process


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def personas(server: ServerProcess) -> dict[str, dict[str, Any]]:
    """Personas uploaded once for the module: name -> stored record."""
    uploads = {
        "pirate": (LLAMA, {1: random_vector(64, 1)}, 6.0),
        "formal": (LLAMA, {0: random_vector(64, 2), 2: random_vector(64, 3)}, 3.0),
        "quitter": (LLAMA, {1: random_vector(64, 4)}, 1.0),
        "calm": (QWEN, {1: random_vector(48, 5)}, 5.0),
    }
    records = {}
    for name, (model, layers, strength) in uploads.items():
        response = upload(server.url, name, model, layers, strength, description=f"{name} test persona")
        assert response.status_code == 200, response.text
        records[name] = response.json()
    return records


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    process = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield process
    process.stop()
