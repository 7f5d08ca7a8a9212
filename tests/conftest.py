from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.engine.hf.backend import HFBackend
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build (once per session) a tiny random model of an architecture; returns its directory."""
    built: dict[str, Path] = {}

    def build(architecture: str) -> Path:
        if architecture not in built:
            built[architecture] = build_tiny_model(tmp_path_factory.mktemp(architecture), architecture)
        return built[architecture]

    return build


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llama_backend(llama_dir: Path) -> Iterator[HFBackend]:
    backend = HFBackend.load(llama_dir, model_id="tiny-llama", max_batch_size=32)
    yield backend
    backend.scheduler.stop()
