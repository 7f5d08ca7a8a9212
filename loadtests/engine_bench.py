"""Engine benchmark: steering cost, persona diversity and batching gain of the HF engine.

Drives ``HFBackend`` directly (no HTTP) on a random-weight Llama (hidden 512, 8 blocks, 8 heads,
intermediate 1408, vocab 400, float32: the project's reference serving model) and measures, in one
interleaved run, completion tokens per second for each condition. Conditions run round-robin, in a
shuffled order each round, so that the machine's drift hits them all alike; the ratios are what count.

    python -m loadtests.engine_bench [--rounds 3] [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loadtests.bench_options import bench_parser
from server.engine.base import ChatMessage, GenerationRequest, SamplingParams
from server.engine.hf.backend import HFBackend
from server.steering.plan import SteeringPlan
from testkit.round_orders import round_orders
from testkit.tiny_models import build_tiny_model

REFERENCE_SIZES = {
    "hidden_size": 512,
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 8,
    "intermediate_size": 1408,
    "max_positions": 2048,
    "initializer_range": 0.02,
}
QUESTIONS = [
    "tell me about the sea and the ships on it",
    "what is the weather today in the harbor",
    "where did the captain hide the gold",
    "good morning, how is the crew",
]


@dataclass
class Condition:
    name: str
    concurrency: int
    plan_for: Callable[[int], SteeringPlan | None]  # request index -> plan
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def personas(count: int, layers: list[int], hidden: int, strength: float = 4.0) -> list[SteeringPlan]:
    generator = torch.Generator().manual_seed(0)
    return [
        SteeringPlan({layer: torch.randn(hidden, generator=generator) for layer in layers}, strength=strength)
        for _ in range(count)
    ]


async def run_condition(
    backend: HFBackend, condition: Condition, requests: int, max_tokens: int
) -> tuple[int, float]:
    gate = asyncio.Semaphore(condition.concurrency)

    async def one(index: int) -> int:
        request = GenerationRequest(
            messages=[ChatMessage("user", QUESTIONS[index % len(QUESTIONS)])],
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            steering=condition.plan_for(index),
        )
        async with gate:
            last = None
            async for chunk in backend.generate(request):
                last = chunk
            return last.completion_tokens if last else 0

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(requests)))
    return sum(counts), time.perf_counter() - start


def build_conditions(hidden: int, num_layers: int) -> list[Condition]:
    middle = [num_layers // 2]
    every = list(range(num_layers))
    one_layer = personas(1, middle, hidden)[0]
    all_layers = personas(1, every, hidden)[0]
    sixteen = personas(16, every, hidden)
    return [
        Condition("unsteered c=1", 1, lambda i: None),
        Condition("unsteered c=16", 16, lambda i: None),
        Condition("steered 1 layer c=16", 16, lambda i: one_layer),
        Condition("steered all layers, K=1 c=16", 16, lambda i: all_layers),
        Condition("steered all layers, K=16 c=16", 16, lambda i: sixteen[i % 16]),
    ]


# (label, numerator condition, denominator condition, target)
RATIOS = [
    ("steered 1 layer / unsteered (c=16)", "steered 1 layer c=16", "unsteered c=16", 0.97),
    ("steered all layers / unsteered (c=16)", "steered all layers, K=1 c=16", "unsteered c=16", 0.97),
    (
        "K=16 personas / K=1 (c=16, all layers)",
        "steered all layers, K=16 c=16",
        "steered all layers, K=1 c=16",
        0.9,
    ),
    ("concurrency 16 / concurrency 1 (unsteered)", "unsteered c=16", "unsteered c=1", 4.0),
]


def ratio(conditions: dict[str, Condition], top: str, bottom: str) -> float:
    return conditions[top].tokens_per_second / conditions[bottom].tokens_per_second


async def main(rounds: int, requests: int, max_tokens: int, json_out: Path | None) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_tiny_model(Path(folder) / "bench-llama", "llama", **REFERENCE_SIZES)
        backend = HFBackend.load(model_dir, model_id="bench-llama", max_batch_size=32)
    conditions = build_conditions(backend.info.hidden_size, backend.info.num_layers)
    await run_condition(backend, conditions[1], 16, 8)  # warm-up: allocator, kernels
    for order in round_orders(conditions, rounds):
        for condition in order:
            # Fewer requests alone: at concurrency 1 the same count would dominate the run time.
            count = requests if condition.concurrency > 1 else max(4, requests // 8)
            tokens, seconds = await run_condition(backend, condition, count, max_tokens)
            condition.tokens += tokens
            condition.seconds += seconds
    await backend.close()

    by_name = {c.name: c for c in conditions}
    print(
        f"\nHF engine, random Llama d=512 x 8 blocks, float32, {torch.get_num_threads()} threads, "
        f"{rounds} rounds, {requests} requests x {max_tokens} tokens per round (greedy)\n"
    )
    print(f"| {'condition':<31} | {'tokens/s':>9} |")
    print(f"|{'-' * 33}|{'-' * 11}|")
    for condition in conditions:
        print(f"| {condition.name:<31} | {condition.tokens_per_second:>9.1f} |")
    ratios = {label: (ratio(by_name, top, bottom), target) for label, top, bottom, target in RATIOS}
    print(f"\n| {'ratio':<44} | {'measured':>8} | {'target':>7} | {'met':>3} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 9}|{'-' * 5}|")
    for name, (value, target) in ratios.items():
        met = "yes" if value >= target else "no"
        print(f"| {name:<44} | {value:>8.3f} | {'>=' + str(target):>7} | {met:>3} |")
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "tokens_per_second": {c.name: c.tokens_per_second for c in conditions},
                    "ratios": {name: value for name, (value, _) in ratios.items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    args = bench_parser(__doc__, rounds=3, requests=32).parse_args()
    asyncio.run(main(args.rounds, args.requests, args.max_tokens, args.json))
