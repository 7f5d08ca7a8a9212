"""Chat latency while a bake runs, on the same model and on another, against none (issue 29).

Starts ``persona-server serve`` on the demo models (a fresh data dir, default job limits) and drives
demo-llama with non-streamed chat requests of 16 tokens (``ignore_eos``, greedy) at concurrency 4,
in rounds of three conditions (each round starts with the next one): no job; a bake of the pirate
persona into demo-llama (the chat's own model: its teacher answers share the engine with the chat);
a bake into demo-qwen (another model: only the machine's cores are shared). During a bake the chat
runs from the bake's start to its end, so every phase of it (sampling, training, writing, loading,
retention) is measured; without a job, as many requests as the last bake condition saw (at least
64). Bakes use the API's defaults unless told; each baked model is deleted afterwards (DELETE
/admin/models/{id}).

    python -m loadtests.jobs_bench [--rounds 2] [--trajectories 200] [--steps 300] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from loadtests.engine_bench import QUESTIONS
from testkit.server_process import ServerProcess

CHAT_MODEL = "demo-llama"
CONDITIONS = {"no job": None, "bake on the same model": "demo-llama", "bake on another model": "demo-qwen"}
CONCURRENCY = 4
MAX_TOKENS = 16
WARM_UP = 64  # requests before measuring (the first ones of a fresh server are slow)
MIN_PLAIN_REQUESTS = 64
# A bake's phases by its job's progress (server/baking/bake.py reports these fractions).
PHASES = [(0.2, "sampling"), (0.8, "training"), (0.85, "writing, loading"), (1.01, "retention")]
Sample = tuple[float, str]  # a chat's latency, and the bake's phase when it was sent ("-": none)


async def chat_once(client: openai.AsyncOpenAI, index: int) -> float:
    started = time.perf_counter()
    answer = await client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    if answer.usage is None or answer.usage.completion_tokens != MAX_TOKENS:
        raise RuntimeError(f"an answer of {answer.usage} tokens, not {MAX_TOKENS}")
    return time.perf_counter() - started


async def chat_until(client: openai.AsyncOpenAI, phase: Any, samples: list[Sample]) -> None:
    """CONCURRENCY clients, each asking again as soon as answered, until ``phase()`` is None."""

    async def one_client(offset: int) -> None:
        index = offset
        while (now := await phase()) is not None:
            samples.append((await chat_once(client, index), now))
            index += CONCURRENCY

    await asyncio.gather(*(one_client(i) for i in range(CONCURRENCY)))


def phase_of(progress: float) -> str:
    return next(name for end, name in PHASES if progress < end)


async def bake_condition(
    server: ServerProcess, client: openai.AsyncOpenAI, model: str, name: str, bake: dict[str, Any]
) -> tuple[list[Sample], float]:
    """Chat latencies while a bake into ``model`` runs, and the bake's seconds."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as admin:
        started = await admin.post(
            "/admin/personas/pirate/bake", json={"model": model, "served_name": name, **bake}
        )
        started.raise_for_status()
        status_url, began = started.json()["status_url"], time.perf_counter()
        status: dict[str, Any] = {}

        async def phase() -> str | None:
            nonlocal status
            status = (await admin.get(status_url)).json()
            running = status["status"] in ("queued", "running")
            return phase_of(status["progress"]) if running else None

        samples: list[Sample] = []
        await chat_until(client, phase, samples)
        seconds = time.perf_counter() - began
        if status["status"] != "succeeded":
            raise RuntimeError(f"the bake into {model} ended {status['status']}: {status.get('error')}")
        (await admin.delete(f"/admin/models/{name}")).raise_for_status()
    return samples, seconds


async def plain_condition(client: openai.AsyncOpenAI, requests: int) -> list[Sample]:
    samples: list[Sample] = []

    async def phase() -> str | None:
        return "-" if len(samples) < requests else None

    await chat_until(client, phase, samples)
    return samples


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def row(label: str, values: list[float], base: float, extra: str = "") -> str:
    p50, p95 = statistics.median(values), percentile(values, 0.95)
    return f"| {label} | {len(values)} | {p50:.3f} | {p95:.3f} | {p50 / base:.2f} |{extra}"


def tables(samples: dict[str, list[Sample]], bake_seconds: dict[str, list[float]]) -> str:
    base = statistics.median(latency for latency, _ in samples["no job"])
    lines = [
        "| condition | requests | p50 (s) | p95 (s) | p50 / no job | bake (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, seen in samples.items():
        bakes = ", ".join(f"{s:.0f}" for s in bake_seconds.get(name, [])) or "-"
        lines.append(row(name, [latency for latency, _ in seen], base, f" {bakes} |"))
    lines += [
        "",
        "| condition, bake phase | requests | p50 (s) | p95 (s) | p50 / no job |",
        "|---|---|---|---|---|",
    ]
    for name, seen in samples.items():
        for _, phase in PHASES if name != "no job" else []:
            values = [latency for latency, during in seen if during == phase]
            if values:
                lines.append(row(f"{name}, {phase}", values, base))
    return "\n".join(lines)


async def measure(
    server: ServerProcess, rounds: int, bake: dict[str, Any]
) -> tuple[dict[str, list[Sample]], dict[str, list[float]]]:
    samples: dict[str, list[Sample]] = {name: [] for name in CONDITIONS}
    bake_seconds: dict[str, list[float]] = {}
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    await plain_condition(client, WARM_UP)  # not counted
    requests = MIN_PLAIN_REQUESTS
    for round_index in range(rounds):
        names = list(CONDITIONS)
        for name in names[round_index % 3 :] + names[: round_index % 3]:  # each round starts elsewhere
            model = CONDITIONS[name]
            if model is None:
                samples[name] += await plain_condition(client, requests)
                continue
            served = f"bench-{round_index}-{model}"
            seen, seconds = await bake_condition(server, client, model, served, bake)
            samples[name] += seen
            bake_seconds.setdefault(name, []).append(seconds)
            requests = max(MIN_PLAIN_REQUESTS, len(seen))
            print(f"round {round_index + 1}: {name}: {len(seen)} chats during a {seconds:.0f} s bake")
    return samples, bake_seconds


async def main(rounds: int, bake: dict[str, Any], json_out: Path | None) -> None:
    with (
        tempfile.TemporaryDirectory() as data_dir,
        ServerProcess(["--data-dir", data_dir], log_path=Path(data_dir) / "server.log") as server,
    ):
        samples, bake_seconds = await measure(server, rounds, bake)
    print(f"\nchat to {CHAT_MODEL}, {MAX_TOKENS} tokens, concurrency {CONCURRENCY}, {rounds} rounds")
    print(f"bakes of the pirate persona: {bake}\n")
    print(tables(samples, bake_seconds))
    if json_out is not None:
        json_out.write_text(json.dumps({"samples": samples, "bake_seconds": bake_seconds}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trajectories", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, {"trajectories": args.trajectories, "steps": args.steps}, args.json_out))
