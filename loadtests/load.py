"""A load driver for any OpenAI-compatible endpoint, reporting what `vllm bench serve` reports.

Async, streaming chat requests with a fixed seed, at a fixed concurrency or with Poisson arrivals
(``--request-rate``), persona fields through ``--extra-body``. Per request: TTFT (to the first
chunk), ITL (between chunks), TPOT ((E2E - TTFT) / (tokens - 1)), E2EL; output tokens from the
server's usage when it streams it, else one per chunk.

    python -m loadtests.load --base-url http://127.0.0.1:8000/v1 --model demo-llama \\
        --num-prompts 64 --concurrency 8 --max-tokens 64 --extra-body '{"persona": "pirate"}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openai

PROMPTS = [
    "Tell me about the sea.",
    "What do you know about the moon?",
    "How is bread made?",
    "Why does it rain?",
    "Describe a cat.",
    "What are mountains like?",
    "Tell me about trains.",
    "What is music?",
]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, args: argparse.Namespace) -> Result:
    start = time.perf_counter()
    result = Result(ok=False)
    previous = None
    chunks = usage = 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=args.extra_body,
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            if previous is None:
                result.ttft = now - start
            else:
                result.itl.append(now - previous)
            previous = now
            chunks += 1
        result.e2el = time.perf_counter() - start
        result.tokens = usage or chunks
        result.ok = True
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    rng = random.Random(args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    gate = asyncio.Semaphore(args.concurrency or args.num_prompts)

    async def gated(prompt: str) -> Result:
        async with gate:
            return await one(client, args.model, prompt, args)

    start = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(gated(prompt)))
        if args.request_rate:  # Poisson arrivals
            await asyncio.sleep(rng.expovariate(args.request_rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return summarize(results, duration)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    array = np.asarray(values) * 1000
    return {"mean": float(array.mean()), **{f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 99)}}


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_token_throughput": tokens / duration,
        "total_output_tokens": tokens,
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": _stats([i for r in done for i in r.itl]),
        "e2el_ms": _stats([r.e2el for r in done]),
    }


def print_report(summary: dict[str, Any]) -> None:
    print(f"completed {summary['completed']}, failed {summary['failed']}, {summary['duration_s']:.1f} s")
    print(
        f"request throughput {summary['request_throughput']:.2f} req/s, "
        f"output {summary['output_token_throughput']:.1f} tok/s"
    )
    print("| metric (ms) | mean | p50 | p90 | p99 |\n|---|---|---|---|---|")
    for name in ("ttft", "tpot", "itl", "e2el"):
        s = summary[f"{name}_ms"]
        print(f"| {name.upper()} | {s['mean']:.1f} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} |")
    for error in summary["errors"]:
        print("error:", error)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8, help="0: no limit (use --request-rate)")
    parser.add_argument(
        "--request-rate", type=float, default=0.0, help="Poisson arrivals per second; 0: all at once"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    print_report(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
