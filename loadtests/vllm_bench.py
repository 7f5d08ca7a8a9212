"""vLLM engine benchmark: persona-server's vLLM engine against plain vLLM, on the same folder.

The reference model of PEERS.md (a random-weight Llama: hidden 512, 8 blocks, 8 heads of 64,
intermediate 1408, vocab 400, float32) is served on this machine at the same time by:

- persona-server ``--engine vllm`` (eager mode, which its hooks need), three conditions: unsteered;
  one persona for every request; 16 distinct personas (request i carries persona i mod 16, so every
  batch mixes 8 of them at concurrency 8);
- persona-server ``--engine hf`` on the same folder, unsteered and one persona (where our own engine
  stands against vLLM on one model);
- plain vLLM, ``python -m vllm.entrypoints.openai.api_server --model PATH --dtype float32
  --max-model-len 2048``, compiled (vLLM's default) and with ``--enforce-eager``.

Every condition streams the same greedy chat requests with the same max_tokens, ``ignore_eos``, all
conditions interleaved round-robin (``loadtests/interleaved.py``); tokens are the servers' own
streamed usage. vLLM runs with ``VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0``
(both cores) and ``VLLM_CPU_KVCACHE_SPACE=2``, for persona-server and plain vLLM alike.

``--monitoring`` adds four persona-server vllm conditions: unsteered with ``persona_monitor`` of p0
(read while generating: nothing is steered up to p0's blocks), one persona monitored (p0 steers the
blocks it reads: read back), a ``persona_target`` on p0 and a ``persona_when`` rule that reads p0 at
every token and never fires (closed loops run in vLLM's workers).

    python -m loadtests.vllm_bench [--rounds 3] [--requests 16] [--max-tokens 64] [--monitoring]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtests.engine_bench import REFERENCE_SIZES
from loadtests.interleaved import Condition, print_ratios, print_table, run_interleaved
from loadtests.peers import VLLM_ENV, vllm_server
from server.testing.personas import random_vector, upload
from server.testing.server_process import ServerProcess
from server.testing.tiny_models import build_tiny_model

MODEL = "bench-llama"
PERSONAS = 16
PERSONA_BLOCKS = (3, 5)  # of 8
CONCURRENCIES = (1, 8)


def ours(model_dir: Path, work: Path, engine: str) -> ServerProcess:
    args = ["--engine", engine, "--model", str(model_dir), "--served-model-name", MODEL, "--max-model-len",
            "2048", "--data-dir", str(work / f"data-{engine}"), "--max-tokens-cap", "2048"]  # fmt: skip
    return ServerProcess(
        args, env=VLLM_ENV, log_path=work / f"persona-server-{engine}.log", ready_timeout=600
    )


def conditions_at(n: int, vllm_url: str, hf_url: str, compiled_url: str, eager_url: str) -> list[Condition]:
    plain = {"ignore_eos": True}
    one = {**plain, "persona": "p0"}
    many = [{**plain, "persona": f"p{i}"} for i in range(PERSONAS)]
    return [
        Condition("persona-server vllm, unsteered", vllm_url, MODEL, n, [plain]),
        Condition("persona-server vllm, one persona", vllm_url, MODEL, n, [one]),
        Condition(f"persona-server vllm, {PERSONAS} personas", vllm_url, MODEL, n, many),
        Condition("persona-server hf, unsteered", hf_url, MODEL, n, [plain]),
        Condition("persona-server hf, one persona", hf_url, MODEL, n, [one]),
        Condition("vllm, compiled", compiled_url, MODEL, n, [plain]),
        Condition("vllm, eager", eager_url, MODEL, n, [plain]),
    ]


def monitoring_conditions_at(n: int, vllm_url: str) -> list[Condition]:
    """With --monitoring: monitored answers and closed loops on persona-server's vLLM engine."""
    plain = {"ignore_eos": True}
    quiet = {"monitor": "p0", "above": 1e9, "steer": {"name": "p1"}}
    fields = {
        "unsteered, monitored": {**plain, "persona_monitor": ["p0"]},
        "one persona, monitored": {**plain, "persona": "p0", "persona_monitor": ["p0"]},
        "one persona, target": {**plain, "persona_target": {"name": "p0", "score": 1.0}},
        "unsteered, quiet rule": {**plain, "persona_when": [quiet]},
    }
    return [
        Condition(f"persona-server vllm, {name}", vllm_url, MODEL, n, [body]) for name, body in fields.items()
    ]


def monitoring_ratios(by: dict[tuple[str, int], float], n: int) -> dict[str, tuple[float, float | None]]:
    def rate(condition: str) -> float:
        return by[(f"persona-server vllm, {condition}", n)]

    return {
        f"unsteered monitored / unsteered, c={n}": (rate("unsteered, monitored") / rate("unsteered"), 0.9),
        f"one persona monitored / one persona, c={n}": (
            rate("one persona, monitored") / rate("one persona"),
            0.8,
        ),
        f"one persona, target / one persona, c={n}": (
            rate("one persona, target") / rate("one persona"),
            None,
        ),
        f"unsteered, quiet rule / unsteered, c={n}": (
            rate("unsteered, quiet rule") / rate("unsteered"),
            None,
        ),
    }


def ratios(conditions: list[Condition]) -> dict[str, tuple[float, float | None]]:
    by = {c.key: c.tokens_per_second for c in conditions}
    out: dict[str, tuple[float, float | None]] = {}
    for n in CONCURRENCIES:
        if ("persona-server vllm, unsteered, monitored", n) in by:
            out.update(monitoring_ratios(by, n))
        unsteered = by[("persona-server vllm, unsteered", n)]
        one = by[("persona-server vllm, one persona", n)]
        out[f"one persona / unsteered, c={n}"] = (one / unsteered, 0.95)
        out[f"{PERSONAS} personas / one persona, c={n}"] = (
            by[(f"persona-server vllm, {PERSONAS} personas", n)] / one,
            0.9,
        )
        out[f"persona-server vllm unsteered / vllm eager, c={n}"] = (unsteered / by[("vllm, eager", n)], 0.95)
        out[f"persona-server vllm unsteered / vllm compiled, c={n}"] = (
            unsteered / by[("vllm, compiled", n)],
            0.95,
        )
        out[f"persona-server hf unsteered / vllm compiled, c={n}"] = (
            by[("persona-server hf, unsteered", n)] / by[("vllm, compiled", n)],
            None,
        )
        out[f"persona-server hf one persona / persona-server vllm one persona, c={n}"] = (
            by[("persona-server hf, one persona", n)] / one,
            None,
        )
    return out


async def main(rounds: int, requests: int, max_tokens: int, json_out: Path | None, monitoring: bool) -> None:
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        work = Path(folder)
        model_dir = build_tiny_model(work / MODEL, "llama", **REFERENCE_SIZES)
        # One server at a time: each vLLM start-up takes both cores.
        ours_vllm = stack.enter_context(ours(model_dir, work, "vllm"))
        hf_server = stack.enter_context(ours(model_dir, work, "hf"))
        compiled = stack.enter_context(vllm_server(model_dir, MODEL, work / "vllm-compiled.log"))
        eager = stack.enter_context(vllm_server(model_dir, MODEL, work / "vllm-eager.log", eager=True))
        for server in (ours_vllm, hf_server):
            for index in range(PERSONAS):
                layers = {block: random_vector(512, 2 * index + k) for k, block in enumerate(PERSONA_BLOCKS)}
                upload(server.url, f"p{index}", MODEL, layers, 2.0).raise_for_status()
        urls = (ours_vllm.url, hf_server.url, compiled.url, eager.url)
        conditions = [c for n in CONCURRENCIES for c in conditions_at(n, *urls)]
        if monitoring:
            conditions += [c for n in CONCURRENCIES for c in monitoring_conditions_at(n, ours_vllm.url)]
        await run_interleaved(conditions, rounds, requests, max_tokens)
    print(f"\nReference Llama (d=512, 8 blocks, head dim 64, float32), {os.cpu_count()} cores, "
          f"{rounds} rounds x {requests} chat requests x {max_tokens} tokens, greedy\n")  # fmt: skip
    figures = print_table(conditions)
    measured = ratios(conditions)
    print_ratios(measured)
    if json_out is not None:
        json_out.write_text(
            json.dumps({"figures": figures, "ratios": {k: v for k, (v, _) in measured.items()}}, indent=2)
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16, help="requests per condition and round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--monitoring", action="store_true", help="add monitored answers and closed loops on the vllm engine"
    )
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.requests, args.max_tokens, args.json, args.monitoring))
