"""What ablate and cap cost against add, on every engine, in one run.

The peer comparison's reference model (``loadtests.compare``: a random-weight Llama, hidden 512,
8 blocks, float32; the same weights as GGUF F32) served by persona-server through the HF engine and
llama.cpp, and with ``--vllm`` by a second persona-server on the vLLM engine. Three conditions per
engine, interleaved round-robin (``loadtests/interleaved.py``), greedy chat requests streamed to
max_tokens: one persona added (``p0`` at its default strength 2 on blocks 3 and 5); the same persona
added, then capped at 0 at the same blocks (a cap that acts on the pushed tokens); the same persona
added, then ablated; and 16 personas added (request i carries p{i mod 16}), the cost of llama.cpp's
per-row lane itself, which every edit takes there. The target (issue 33): capped / added and
ablated / added >= 0.95 in tokens per second at concurrency 8 on each engine.

    python -m loadtests.operators_bench [--rounds 3] [--requests 16] [--max-tokens 64] [--vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtests.bench_options import bench_parser
from loadtests.compare import (
    GGUF_MODEL,
    HF_MODEL,
    PERSONAS,
    TARGET_CONCURRENCY,
    reference_server_args,
    upload_personas,
    vllm_server_args,
)
from loadtests.interleaved import Condition, report, run_interleaved
from loadtests.peers import VLLM_ENV
from testkit.server_process import ServerProcess

ADDED = {"name": "p0"}
OPERATORS = {
    "added": [ADDED],
    "added, then capped": [ADDED, {"name": "p0", "operator": "cap", "max": 0.0}],
    "added, then ablated": [ADDED, {"name": "p0", "operator": "ablate"}],
}


def operator_conditions(family: str, url: str, model: str, concurrency: int) -> list[Condition]:
    """The three operator conditions, and 16 personas added (request i carries p{i mod 16}): on
    llama.cpp an edit takes the per-row lane where one added persona takes a control-vector lane, and
    the 16 personas show what the per-row lane itself costs."""
    conditions = [
        Condition(f"{family}, {name}", url, model, concurrency, [{"ignore_eos": True, "persona": persona}])
        for name, persona in OPERATORS.items()
    ]
    mixed = [{"ignore_eos": True, "persona": f"p{i}"} for i in range(PERSONAS)]
    return [*conditions, Condition(f"{family}, {PERSONAS} personas added", url, model, concurrency, mixed)]


def ratios(conditions: list[Condition], families: list[str]) -> dict[str, tuple[float, float | None]]:
    by = {c.key: c.tokens_per_second for c in conditions}
    out: dict[str, tuple[float, float | None]] = {}
    for family in families:
        added = by[(f"{family}, added", TARGET_CONCURRENCY)]
        mixed = by[(f"{family}, {PERSONAS} personas added", TARGET_CONCURRENCY)]
        for name in ("added, then capped", "added, then ablated"):
            rate = by[(f"{family}, {name}", TARGET_CONCURRENCY)]
            out[f"{family}: {name} / added"] = (rate / added, 0.95)
            out[f"{family}: {name} / {PERSONAS} personas added"] = (rate / mixed, None)
    return out


def _server(args: list[str], work: Path, name: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(args, env=env, log_path=work / f"{name}.log", ready_timeout=600)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, ExitStack() as servers:
        work = Path(folder)
        model_dir, _, ours_args = reference_server_args(work, args.max_tokens)
        ours = servers.enter_context(_server(ours_args, work, "persona-server"))
        upload_personas(ours.url, [HF_MODEL, GGUF_MODEL])
        conditions = operator_conditions("HF", ours.url, HF_MODEL, TARGET_CONCURRENCY)
        conditions += operator_conditions("GGUF", ours.url, GGUF_MODEL, TARGET_CONCURRENCY)
        families = ["HF", "GGUF"]
        if args.vllm:
            vllm_args = vllm_server_args(model_dir, work, args.max_tokens)
            ours_vllm = servers.enter_context(_server(vllm_args, work, "persona-server-vllm", VLLM_ENV))
            upload_personas(ours_vllm.url, [HF_MODEL])
            conditions += operator_conditions("vLLM", ours_vllm.url, HF_MODEL, TARGET_CONCURRENCY)
            families.append("vLLM")
        await run_interleaved(conditions, args.rounds, args.requests, args.max_tokens)
    heading = (
        f"\nReference Llama (d=512, 8 blocks, float32; GGUF F32), {os.cpu_count()} cores, "
        f"{args.rounds} rounds x {args.requests} chat requests x {args.max_tokens} tokens, greedy, "
        f"concurrency {TARGET_CONCURRENCY}\n"
    )
    return report(conditions, ratios(conditions, families), heading, args.json)


if __name__ == "__main__":
    parser = bench_parser(__doc__, rounds=3, requests=16)
    parser.add_argument("--vllm", action="store_true", help="add persona-server on the vLLM engine")
    asyncio.run(main(parser.parse_args()))
