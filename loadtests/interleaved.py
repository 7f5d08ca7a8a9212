"""Benchmark conditions driven round-robin in one run, so the machine's drift hits them all alike.

A condition is one server, one model and one set of extra body fields at one concurrency. Each request
streams a greedy chat answer through the official openai client; TTFT is the time to its first chunk
that carries content, even empty (transformers serve sends a role-only chunk before it generates; the
text of a random-weight model is often broken UTF-8, held back until it completes, so the first
non-empty text would measure the text, not the server), TPOT the mean time per later token up to the
last chunk. Tokens come from
the server's own streamed usage, except where a server's usage is known to be wrong (``count_usage``
False: llama_cpp.server), where each request counts max_tokens and must end by length.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from loadtests.engine_bench import QUESTIONS
from testkit.round_orders import round_orders


@dataclass
class Condition:
    name: str
    url: str
    model: str
    concurrency: int
    extra: list[dict[str, Any]]  # per request index (cycled): extra body fields
    count_usage: bool = True  # False: the server's usage is wrong; force and count max_tokens
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.concurrency

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def fresh(self) -> Condition:
        """The same condition with nothing measured (for warm-up runs)."""
        return Condition(self.name, self.url, self.model, self.concurrency, self.extra, self.count_usage)


async def one_request(client: openai.AsyncOpenAI, condition: Condition, index: int, max_tokens: int) -> int:
    extra = dict(condition.extra[index % len(condition.extra)])
    if not condition.count_usage:
        extra["min_tokens"] = max_tokens
    start = time.perf_counter()
    first = last = finish = None
    usage = 0
    stream = await client.chat.completions.create(
        model=condition.model,
        messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and (chunk.choices[0].delta.content is not None or chunk.choices[0].finish_reason):
            last = time.perf_counter()
            first = first or last
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    if finish != "length":
        raise RuntimeError(f"{condition.name}: a request ended with {finish!r}, not after max_tokens")
    tokens = usage if condition.count_usage else max_tokens
    if first is not None and last is not None:
        condition.ttft.append(first - start)
        if tokens > 1:
            condition.tpot.append((last - first) / (tokens - 1))
    return tokens


async def run_condition(condition: Condition, requests: int, max_tokens: int) -> None:
    client = openai.AsyncOpenAI(base_url=f"{condition.url}/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(condition.concurrency)

    async def gated(index: int) -> int:
        async with gate:
            return await one_request(client, condition, index, max_tokens)

    start = time.perf_counter()
    counts = await asyncio.gather(*(gated(i) for i in range(requests)))
    condition.seconds += time.perf_counter() - start
    condition.tokens += sum(counts)
    await client.close()


async def run_interleaved(conditions: list[Condition], rounds: int, requests: int, max_tokens: int) -> None:
    """A short uncounted warm-up of each condition, then ``rounds`` rounds in a shuffled order each."""
    for condition in conditions:
        await run_condition(condition.fresh(), 2, 8)
    for order in round_orders(conditions, rounds):
        for condition in order:
            # Enough requests to keep every slot of the concurrency busy more than once.
            count = (
                max(requests, 2 * condition.concurrency)
                if condition.concurrency > 1
                else max(4, requests // 2)
            )
            await run_condition(condition, count, max_tokens)


def print_table(conditions: list[Condition]) -> dict[str, dict[str, float]]:
    """The markdown table of the figures; returns them by "name c=N"."""
    print("| server, condition | concurrency | tokens/s | TTFT median (ms) | TPOT median (ms) |")
    print("|---|---|---|---|---|")
    figures = {}
    for c in conditions:
        ttft = statistics.median(c.ttft) * 1000 if c.ttft else float("nan")
        tpot = statistics.median(c.tpot) * 1000 if c.tpot else float("nan")
        print(f"| {c.name} | {c.concurrency} | {c.tokens_per_second:.1f} | {ttft:.0f} | {tpot:.1f} |")
        figures[f"{c.name} c={c.concurrency}"] = {
            "tokens_per_second": c.tokens_per_second,
            "ttft_ms": ttft,
            "tpot_ms": tpot,
        }
    return figures


def print_ratios(ratios: dict[str, tuple[float, float]] | dict[str, tuple[float, float | None]]) -> None:
    """name -> (measured, target or None), as a markdown table."""
    print("\n| ratio | measured | target | met |\n|---|---|---|---|")
    for name, (value, target) in ratios.items():
        if target is None:
            print(f"| {name} | {value:.3f} | none | |")
        else:
            print(f"| {name} | {value:.3f} | >= {target} | {'yes' if value >= target else 'no'} |")


def report(
    conditions: list[Condition],
    measured: dict[str, tuple[float, float]] | dict[str, tuple[float, float | None]],
    heading: str,
    json_out: Path | None = None,
) -> dict[str, Any]:
    """The run's heading, its figures' table and its ratios' table; the same as JSON in ``json_out``."""
    print(heading)
    figures = print_table(conditions)
    print_ratios(measured)
    summary = {"figures": figures, "ratios": {name: value for name, (value, _) in measured.items()}}
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=2))
    return summary
