"""vLLM engine benchmark: persona-server's vLLM engine against plain vLLM, on the same folder, both
compiled (vLLM's default), with eager rows beside them.

The reference model of PEERS.md (a random-weight Llama: hidden 512, 8 blocks, 8 heads of 64,
intermediate 1408, vocab 400, float32; ``--hidden``, ``--blocks``, ``--dtype`` for a larger one on a
GPU) is served on this machine at the same time by:

- persona-server ``--engine vllm``, compiled: K distinct personas in the batch for K = 0 (unsteered),
  1, 16 and 32 (request i carries persona i mod K, so a batch at concurrency c mixes min(c, K) of
  them), and unsteered answers monitored in flight (``persona_monitor`` of p0, read inside the
  compiled forward while generating);
- persona-server ``--engine vllm`` with ``enforce_eager``: unsteered and one persona;
- plain vLLM, ``python -m vllm.entrypoints.openai.api_server --model PATH --dtype float32
  --max-model-len 2048``, compiled (its default) and with ``--enforce-eager``.

Every condition streams the same greedy chat requests with the same max_tokens, ``ignore_eos``, all
conditions interleaved in a shuffled order each round (``loadtests/interleaved.py``), at concurrency
1, 8 and 32; tokens are the servers' own streamed usage. On a CPU, vLLM runs with
``VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (both cores) and
``VLLM_CPU_KVCACHE_SPACE=2``, for persona-server and plain vLLM alike.

    python -m loadtests.vllm_bench [--rounds 3] [--requests 16] [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtests.bench_options import bench_parser
from loadtests.engine_bench import REFERENCE_SIZES
from loadtests.interleaved import Condition, report, run_interleaved
from loadtests.peers import VLLM_ENV, vllm_server
from testkit.personas import random_vector, upload
from testkit.server_process import ServerProcess
from testkit.tiny_models import build_tiny_model

MODEL = "bench-llama"
PERSONAS = 32
KS = (1, 16, 32)
CONCURRENCIES = (1, 8, 32)
OURS = "persona-server vllm"


def ours(model_dir: Path, work: Path, dtype: str, eager: bool) -> ServerProcess:
    name = "eager" if eager else "compiled"
    args = [
        *["--engine", "vllm", "--model", str(model_dir), "--served-model-name", MODEL, "--dtype", dtype],
        *["--max-model-len", "2048", "--data-dir", str(work / f"data-{name}"), "--max-tokens-cap", "2048"],
    ]
    if eager:
        args += ["--vllm-engine-args", json.dumps({"enforce_eager": True})]
    return ServerProcess(args, env=VLLM_ENV, log_path=work / f"persona-server-{name}.log", ready_timeout=900)


def conditions_at(n: int, compiled: str, eager: str, plain: str, plain_eager: str) -> list[Condition]:
    plain_body = {"ignore_eos": True}

    def personas(k: int) -> list[dict[str, object]]:
        return [{**plain_body, "persona": f"p{i}"} for i in range(k)]

    return [
        Condition(f"{OURS}, unsteered", compiled, MODEL, n, [plain_body]),
        *(Condition(f"{OURS}, K={k}", compiled, MODEL, n, personas(k)) for k in KS),
        Condition(
            f"{OURS}, unsteered, monitored", compiled, MODEL, n, [{**plain_body, "persona_monitor": ["p0"]}]
        ),
        Condition(f"{OURS} eager, unsteered", eager, MODEL, n, [plain_body]),
        Condition(f"{OURS} eager, K=1", eager, MODEL, n, personas(1)),
        Condition("vllm, compiled", plain, MODEL, n, [plain_body]),
        Condition("vllm, eager", plain_eager, MODEL, n, [plain_body]),
    ]


def ratios(conditions: list[Condition]) -> dict[str, tuple[float, float | None]]:
    """The issue's targets (compiled): unsteered / plain vLLM >= 0.97, one persona / unsteered >= 0.95,
    K = 32 / K = 1 >= 0.9, monitored / unsteered >= 0.9; the eager rows for comparison."""
    by = {c.key: c.tokens_per_second for c in conditions}
    out: dict[str, tuple[float, float | None]] = {}
    for n in CONCURRENCIES:
        rate = lambda name, n=n: by[(name, n)]  # noqa: E731
        unsteered = rate(f"{OURS}, unsteered")
        out[f"unsteered / plain vLLM compiled, c={n}"] = (unsteered / rate("vllm, compiled"), 0.97)
        out[f"one persona / unsteered, c={n}"] = (rate(f"{OURS}, K=1") / unsteered, 0.95)
        out[f"K=16 / K=1, c={n}"] = (rate(f"{OURS}, K=16") / rate(f"{OURS}, K=1"), 0.9)
        out[f"K=32 / K=1, c={n}"] = (rate(f"{OURS}, K=32") / rate(f"{OURS}, K=1"), 0.9)
        out[f"monitored / unsteered, c={n}"] = (rate(f"{OURS}, unsteered, monitored") / unsteered, 0.9)
        out[f"K=1 compiled / K=1 eager, c={n}"] = (rate(f"{OURS}, K=1") / rate(f"{OURS} eager, K=1"), None)
        out[f"eager: unsteered / plain vLLM eager, c={n}"] = (
            rate(f"{OURS} eager, unsteered") / rate("vllm, eager"),
            None,
        )
        out[f"plain vLLM compiled / eager, c={n}"] = (rate("vllm, compiled") / rate("vllm, eager"), None)
    return out


async def main(args: argparse.Namespace) -> None:
    sizes = {**REFERENCE_SIZES, **({"hidden_size": args.hidden} if args.hidden else {})}
    if args.blocks:
        sizes["num_layers"] = args.blocks
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        work = Path(folder)
        model_dir = build_tiny_model(work / MODEL, "llama", **sizes)
        # One server at a time: each vLLM start-up takes the machine.
        compiled = stack.enter_context(ours(model_dir, work, args.dtype, eager=False))
        eager = stack.enter_context(ours(model_dir, work, args.dtype, eager=True))
        plain = stack.enter_context(
            vllm_server(model_dir, MODEL, work / "vllm-compiled.log", dtype=args.dtype)
        )
        plain_eager = stack.enter_context(
            vllm_server(model_dir, MODEL, work / "vllm-eager.log", eager=True, dtype=args.dtype)
        )
        hidden = int(sizes["hidden_size"])
        blocks = int(sizes.get("num_layers", 8))
        steered = (blocks * 3 // 8, blocks * 5 // 8)  # blocks 3 and 5 of 8
        for server in (compiled, eager):
            for index in range(PERSONAS):
                layers = {block: random_vector(hidden, 2 * index + k) for k, block in enumerate(steered)}
                upload(server.url, f"p{index}", MODEL, layers, 2.0).raise_for_status()
        conditions = [
            c
            for n in CONCURRENCIES
            for c in conditions_at(n, compiled.url, eager.url, plain.url, plain_eager.url)
        ]
        await run_interleaved(conditions, args.rounds, args.requests, args.max_tokens)
    heading = (
        f"\nLlama (d={hidden}, {blocks} blocks, {args.dtype}), {os.cpu_count()} cores, {args.rounds} "
        f"rounds x {args.requests} chat requests (at least 2 x concurrency) x {args.max_tokens} tokens, "
        "greedy\n"
    )
    report(conditions, ratios(conditions), heading, args.json)


if __name__ == "__main__":
    parser = bench_parser(__doc__, rounds=3, requests=16)
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: the reference 512)")
    parser.add_argument("--blocks", type=int, default=None, help="decoder blocks (default: the reference 8)")
    parser.add_argument("--dtype", default="float32")
    asyncio.run(main(parser.parse_args()))
