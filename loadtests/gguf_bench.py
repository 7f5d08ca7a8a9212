"""GGUF serving benchmark: persona-server (llama.cpp lanes) vs llama-cpp-python's own server.

Both serve the same GGUF F32 file of the project's reference model (a random-weight Llama, hidden
512, 8 blocks, 8 heads, intermediate 1408, vocab 400) on this machine, at the same time, driven by
the official openai client with the same chat prompts, max_tokens and greedy sampling. Conditions
run round-robin in a rotated order each round, so the machine's drift hits them all alike.

- persona-server, unsteered;
- persona-server, steered with one persona for every request ("same persona");
- persona-server, steered with a different persona per request ("8 personas");
- llama_cpp.server, in the configuration PEERS.md gives (`--chat_format chatml --n_ctx 2048`), plus
  `--interrupt_requests False`: by default a new request cuts off the stream being served, which
  would count tokens never generated.

Each request streams; TTFT is the time to its first chunk (both servers send the first one, the
role, with the first token: the text of a random-weight model is often broken UTF-8, held back until
it completes, so the first non-empty text would measure the text, not the server), TPOT the mean
time per later token up to the last chunk. persona-server's completion tokens come from its own
usage (`stream_options.include_usage`).
llama_cpp.server does not stream usage, and its non-streamed chat usage over-reports (43 completion
tokens for max_tokens 32 on this model, while its completions endpoint reports 32); it is asked for
`min_tokens = max_tokens`, a warm-up request checks that it then ends by length, and each of its
requests counts max_tokens tokens.

    python -m loadtests.gguf_bench [--rounds 2] [--requests 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from loadtests.engine_bench import QUESTIONS, REFERENCE_SIZES
from server.engine.llamacpp.convert import convert_hf_to_gguf
from tests.api_helpers import random_vector, upload
from tests.server_process import ServerProcess, free_port
from tests.tiny_models import build_tiny_model

MODEL = "bench-llama"
PERSONAS = 8
CONCURRENCIES = (1, 4, 8)


class LlamaCppServer:
    """`python -m llama_cpp.server` on a free port, as PEERS.md starts it."""

    def __init__(self, gguf: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--chat_format", "chatml",
            "--n_ctx", "2048", "--port", str(self.port), "--model_alias", MODEL,
            # By default a new request cuts off the stream being served: every request must finish.
            "--interrupt_requests", "False",
        ]  # fmt: skip
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaCppServer:
        self._process = subprocess.Popen(self._args, stdout=self._log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited; see {self._log}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"llama_cpp.server not ready; see {self._log}")

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=20)


@dataclass
class Condition:
    name: str
    url: str
    concurrency: int
    extra: list[dict[str, Any]]  # per request index (cycled): extra body fields
    peer: bool = False
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def one_request(client: openai.AsyncOpenAI, condition: Condition, index: int, max_tokens: int) -> int:
    extra = dict(condition.extra[index % len(condition.extra)])
    options: dict[str, Any] = {}
    if condition.peer:
        extra["min_tokens"] = max_tokens
    else:
        extra["ignore_eos"] = True
        options["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    first = last = finish = None
    chunks = usage = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra, **options,
    )  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices:  # any delta: text of a random model may be held back as broken UTF-8
            last = time.perf_counter()
            first = first or last
            chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    if finish != "length":
        raise RuntimeError(f"{condition.name}: a request ended with {finish!r}, not after max_tokens")
    tokens = max_tokens if condition.peer else usage
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


def check_peer_runs_to_max_tokens(url: str, max_tokens: int) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "max_tokens": max_tokens, "temperature": 0, "min_tokens": max_tokens}  # fmt: skip
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
    if answer["choices"][0]["finish_reason"] != "length":
        raise RuntimeError(f"llama_cpp.server stopped early despite min_tokens: {answer}")


def print_table(conditions: list[Condition], rounds: int, requests: int, max_tokens: int) -> dict[str, Any]:
    print(f"\nGGUF F32 reference Llama (d=512, 8 blocks), {os.cpu_count()} cores, {rounds} rounds x "
          f"{requests} chat requests x {max_tokens} tokens, greedy\n")  # fmt: skip
    print("| server, condition | concurrency | tokens/s | TTFT median (ms) | TPOT median (ms) |")
    print("|---|---|---|---|---|")
    figures = {}
    for c in conditions:
        ttft = statistics.median(c.ttft) * 1000 if c.ttft else float("nan")
        tpot = statistics.median(c.tpot) * 1000 if c.tpot else float("nan")
        print(f"| {c.name} | {c.concurrency} | {c.tokens_per_second:.1f} | {ttft:.0f} | {tpot:.1f} |")
        figures[f"{c.name} c={c.concurrency}"] = {"tokens_per_second": c.tokens_per_second,
                                                   "ttft_ms": ttft, "tpot_ms": tpot}  # fmt: skip
    return figures


def ratios(conditions: list[Condition]) -> dict[str, tuple[float, float]]:
    by = {(c.name, c.concurrency): c.tokens_per_second for c in conditions}
    out = {}
    for n in CONCURRENCIES:
        out[f"same persona / unsteered, c={n}"] = (by[("persona-server, same persona", n)]
                                                   / by[("persona-server, unsteered", n)], 0.97)  # fmt: skip
    out["8 personas / unsteered, c=8"] = (by[("persona-server, 8 personas", 8)]
                                          / by[("persona-server, unsteered", 8)], 0.97)  # fmt: skip
    for name in ("unsteered", "same persona", "8 personas"):
        out[f"persona-server {name} / llama_cpp.server, c=8"] = (
            by[(f"persona-server, {name}", 8)] / by[("llama_cpp.server", 8)],
            1.3,
        )
    return out


async def main(rounds: int, requests: int, max_tokens: int, json_out: Path | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model_dir = build_tiny_model(work / MODEL, "llama", **REFERENCE_SIZES)
        gguf = convert_hf_to_gguf(model_dir, work / f"{MODEL}.gguf")
        ours_args = ["--model", str(gguf), "--served-model-name", MODEL, "--data-dir", str(work / "data"),
                     "--max-tokens-cap", str(max_tokens)]  # fmt: skip
        with (
            ServerProcess(ours_args, log_path=work / "persona-server.log") as ours,
            LlamaCppServer(gguf, work / "llama_cpp.log") as peer,
        ):
            for index in range(PERSONAS):  # blocks 3 and 5 of 8, a different vector each
                layers = {3: random_vector(512, 2 * index), 5: random_vector(512, 2 * index + 1)}
                upload(ours.url, f"p{index}", MODEL, layers, 2.0, admin_key=None).raise_for_status()
            check_peer_runs_to_max_tokens(peer.url, max_tokens)
            conditions = []
            for n in CONCURRENCIES:
                conditions += [
                    Condition("persona-server, unsteered", ours.url, n, [{}]),
                    Condition("persona-server, same persona", ours.url, n, [{"persona": "p0"}]),
                    Condition("persona-server, 8 personas", ours.url, n,
                              [{"persona": f"p{i}"} for i in range(PERSONAS)]),
                    Condition("llama_cpp.server", peer.url, n, [{}], peer=True),
                ]  # fmt: skip
            for condition in conditions[:4]:  # warm-up, not counted
                await run_condition(Condition(**{**condition.__dict__, "ttft": [], "tpot": []}), 2, 8)
            for round_index in range(rounds):
                shift = round_index % len(conditions)
                for condition in conditions[shift:] + conditions[:shift]:
                    count = requests if condition.concurrency > 1 else max(4, requests // 2)
                    await run_condition(condition, count, max_tokens)
    figures = print_table(conditions, rounds, requests, max_tokens)
    measured = ratios(conditions)
    print("\n| ratio | measured | target | met |\n|---|---|---|---|")
    for name, (value, target) in measured.items():
        print(f"| {name} | {value:.3f} | >= {target} | {'yes' if value >= target else 'no'} |")
    if json_out is not None:
        summary = {"figures": figures, "ratios": {k: v for k, (v, _) in measured.items()}}
        json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16, help="requests per condition and round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.requests, args.max_tokens, args.json))
