"""Models loaded on several threads at once (issue 29, item 3).

transformers patches process-wide state while it builds a model (``PreTrainedModel.tie_weights``
becomes a no-op, ``torch.linspace`` is wrapped); two builds on two threads restored each other's
patches, so after one burst of concurrent loads no tied model loaded again ("Cannot copy out of meta
tensor") until a restart. The bake test of the API posts six bakes at once; this is the quick loop's
version, on the loaders themselves (the engine's and the GGUF converter's, as a bake calls them).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from server.demo.models import demo_model_dir
from server.engine.hf.backend import HFBackend
from server.gguf.model import convert_hf_to_gguf

DEMO_MODELS = ("demo-llama", "demo-phi3", "demo-qwen")  # all three tie their embeddings
ROUNDS = 3  # one round of six broke the old code about four times in five; three almost always


def at_once(loads: list[Callable[[], Any]]) -> tuple[list[Any], list[BaseException]]:
    """Run every load on its own thread, all released together; what they returned and raised."""
    start = threading.Barrier(len(loads))
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(load: Callable[[], Any]) -> None:
        start.wait()
        try:
            results.append(load())
        except Exception as exc:  # collected: the test names every failure
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(load,)) for load in loads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results, errors


def close(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, HFBackend):
            asyncio.run(result.close())


def six_loads(folder: Path) -> list[Callable[[], Any]]:
    """Each demo model as the engine loads it, and as the GGUF converter of a bake loads it."""
    folder.mkdir()
    engines = [lambda name=name: HFBackend.load(demo_model_dir(name)) for name in DEMO_MODELS]
    conversions = [
        lambda name=name: convert_hf_to_gguf(demo_model_dir(name), folder / f"{name}.gguf")
        for name in DEMO_MODELS
    ]
    return engines + conversions


def test_models_loaded_at_once_all_load_and_later_loads_too(tmp_path: Path) -> None:
    tie_weights, linspace = PreTrainedModel.tie_weights, torch.linspace
    for round_ in range(ROUNDS):
        results, errors = at_once(six_loads(tmp_path / str(round_)))
        close(results)
        assert not errors, [repr(error) for error in errors]
        # What transformers patches while it builds is back as it was, for every later load.
        assert PreTrainedModel.tie_weights is tie_weights and torch.linspace is linspace
    close([HFBackend.load(demo_model_dir("demo-qwen"))])


@pytest.mark.slow  # 24 figures drawn
def test_loss_curves_drawn_at_once_all_draw() -> None:
    """Issue 29 (seen in CI): bakes that finished together drew their loss curves on worker threads at
    once, and pyplot's shared parser failed most of them ("Unknown symbol: \\mathdefault")."""
    from concurrent.futures import ThreadPoolExecutor

    from server.baking.outputs import loss_curve_png

    losses = [1.0 / (step + 1) for step in range(50)]
    with ThreadPoolExecutor(6) as pool:
        pngs = list(pool.map(lambda i: loss_curve_png(losses, f"bake {i}"), range(24)))
    assert all(png.startswith(b"\x89PNG") for png in pngs)
