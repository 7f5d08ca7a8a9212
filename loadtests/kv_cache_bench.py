"""Decode-step time of the HF engine with its in-place growing KV cache vs transformers' concatenating one.

The reference Llama (hidden 512, 8 blocks, float32), a batch of 8 prompts of each context length,
then timed decode steps; the two caches alternate within one process (the order flips every
repetition), and the table gives the median step time of each.

    python -m loadtests.kv_cache_bench [--contexts 100 400 1000] [--repetitions 6] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, DynamicCache

from loadtests.engine_bench import REFERENCE_SIZES
from server.engine.hf.kv_batch import KVBatch
from server.engine.hf.kv_cache import GrowingCache
from server.engine.hf.runner import ModelRunner
from testkit.tiny_models import build_tiny_model

BATCH = 8
CACHES = {"growing in place": GrowingCache, "concatenating (transformers)": DynamicCache}


def step_milliseconds(runner: ModelRunner, context: int, steps: int) -> float:
    prompts = [[5 + (row * 7 + i) % 300 for i in range(context)] for row in range(BATCH)]
    _, cache, mask = runner.prefill(prompts, [None] * BATCH)
    batch = KVBatch()
    batch.append(cache, mask)
    for _ in range(3):  # the first steps grow the prefill's exact-size tensors
        runner.decode(batch, [1] * BATCH, None)
    start = time.perf_counter()
    for _ in range(steps):
        runner.decode(batch, [1] * BATCH, None)
    return (time.perf_counter() - start) / steps * 1000


def main(contexts: list[int], repetitions: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_tiny_model(Path(folder) / "bench-llama", "llama", **REFERENCE_SIZES)
        runner = ModelRunner(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    print(
        f"\nHF engine decode step, reference Llama, batch {BATCH}, median of {repetitions} x {steps} steps\n"
    )
    print("| cached tokens | growing in place (ms) | concatenating (ms) | concatenating / growing |")
    print("|---|---|---|---|")
    for context in contexts:
        times: dict[str, list[float]] = {name: [] for name in CACHES}
        for repetition in range(repetitions):
            names = list(CACHES) if repetition % 2 == 0 else list(reversed(CACHES))
            for name in names:
                runner.cache_factory = CACHES[name]
                times[name].append(step_milliseconds(runner, context, steps))
        growing, concatenating = (statistics.median(times[name]) for name in CACHES)
        print(f"| {context} | {growing:.1f} | {concatenating:.1f} | {concatenating / growing:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--repetitions", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    arguments = parser.parse_args()
    main(arguments.contexts, arguments.repetitions, arguments.steps)
