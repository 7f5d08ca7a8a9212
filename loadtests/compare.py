"""persona-server against the servers users would otherwise pick, on the same weights, in one run.

The reference model of PEERS.md (a random-weight Llama: hidden 512, 8 blocks, 8 heads, intermediate
1408, vocab 400, float32) is built as an HF folder and converted to a GGUF F32 file of the same
weights. On this machine, at the same time:

- persona-server serving both (the HF folder through the HF engine, the GGUF through llama.cpp);
- ``transformers serve PATH --continuous-batching --device cpu --dtype float32`` on the HF folder;
- ``python -m llama_cpp.server --chat_format chatml --n_ctx 2048`` on the GGUF (plus
  ``--interrupt_requests False``: by default a new request cuts off the stream being served);
- with ``--vllm`` (needs the vllm extra): a second persona-server serving the HF folder with
  ``--engine vllm``, and plain vLLM (``python -m vllm.entrypoints.openai.api_server --dtype float32
  --max-model-len 2048``, compiled, its default) on the folder, both with ``loadtests.peers.VLLM_ENV``.

persona-server runs five conditions on each model: unsteered; one persona for every request; 16
distinct personas (request i carries persona i mod 16, so every batch mixes 8 of them at concurrency
8); one persona with monitoring on (``persona_monitor`` of that persona: each answer is scored, by a
read-back since the persona steers the monitored blocks); and unsteered with monitoring on (the HF
engine, llama.cpp's per-row lane and the vLLM engine read the monitored blocks while generating).
Every condition streams the same greedy chat requests with the same max_tokens; all conditions are
interleaved round-robin (``loadtests/interleaved.py``). Tokens: persona-server's and transformers
serve's streamed usage; llama_cpp.server's usage over-reports, so it is asked for ``min_tokens =
max_tokens`` and each request counts max_tokens (checked to end by length).

    python -m loadtests.compare [--rounds 3] [--requests 16] [--max-tokens 64] [--concurrency 1 8] [--vllm]
                                [--closed-loop]

``--closed-loop`` adds, on HF and GGUF (and vLLM with ``--vllm``), a target on one persona and a
rule that reads every token and never fires (the cost of closed-loop steering).
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
from loadtests.engine_bench import REFERENCE_SIZES
from loadtests.interleaved import Condition, report, run_interleaved
from loadtests.peers import (
    VLLM_ENV,
    check_llama_cpp_runs_to_max_tokens,
    llama_cpp_server,
    transformers_server,
    vllm_server,
)
from server.gguf.model import convert_hf_to_gguf
from testkit.personas import random_vector, upload
from testkit.server_process import ServerProcess
from testkit.tiny_models import build_tiny_model

HF_MODEL, GGUF_MODEL = "bench-llama", "bench-llama-gguf"
PERSONAS = 16
PERSONA_BLOCKS = (3, 5)  # of 8
TARGET_CONCURRENCY = 8


def persona_conditions(family: str, url: str, model: str, concurrency: int) -> list[Condition]:
    """persona-server's five conditions on one model."""
    plain = {"ignore_eos": True}
    one = {**plain, "persona": "p0"}
    return [
        Condition(f"persona-server {family}, unsteered", url, model, concurrency, [plain]),
        Condition(f"persona-server {family}, one persona", url, model, concurrency, [one]),
        Condition(
            f"persona-server {family}, {PERSONAS} personas",
            url,
            model,
            concurrency,
            [{**plain, "persona": f"p{i}"} for i in range(PERSONAS)],
        ),
        Condition(
            f"persona-server {family}, one persona, monitored",
            url,
            model,
            concurrency,
            [{**one, "persona_monitor": ["p0"]}],
        ),
        Condition(
            f"persona-server {family}, unsteered, monitored",
            url,
            model,
            concurrency,
            [{**plain, "persona_monitor": ["p0"]}],
        ),
    ]


def closed_loop_conditions(family: str, url: str, model: str, concurrency: int) -> list[Condition]:
    """With --closed-loop: a target on one persona (its strength set token by token), and a rule that
    reads every token and never fires (the readings' own cost)."""
    target = {"ignore_eos": True, "persona_target": {"name": "p0", "score": 1.0}}
    quiet = {"monitor": "p0", "above": 1e9, "steer": {"name": "p1"}}
    return [
        Condition(f"persona-server {family}, one persona, target", url, model, concurrency, [target]),
        Condition(
            f"persona-server {family}, unsteered, quiet rule",
            url,
            model,
            concurrency,
            [{"ignore_eos": True, "persona_when": [quiet]}],
        ),
    ]


def ratios(conditions: list[Condition]) -> dict[str, tuple[float, float | None]]:
    """The issue's targets at concurrency 8 (None: reported, no target)."""
    by = {c.key: c.tokens_per_second for c in conditions}
    n = TARGET_CONCURRENCY
    out: dict[str, tuple[float, float | None]] = {}
    families = [("HF", "transformers serve", 1.0), ("GGUF", "llama_cpp.server", 1.3)]
    if ("vllm", n) in by:
        families.append(("vLLM", "vllm", 0.95))
    for family, peer, bar in families:
        ours = f"persona-server {family}"

        def rate(condition: str, ours: str = ours) -> float:
            return by[(f"{ours}, {condition}", n)]

        out[f"{family}: one persona / unsteered"] = (rate("one persona") / rate("unsteered"), 0.97)
        out[f"{family}: {PERSONAS} personas / one persona"] = (
            rate(f"{PERSONAS} personas") / rate("one persona"),
            0.9,
        )
        out[f"{family}: one persona monitored / one persona"] = (
            rate("one persona, monitored") / rate("one persona"),
            None,
        )
        out[f"{family}: unsteered monitored / unsteered"] = (
            rate("unsteered, monitored") / rate("unsteered"),
            None,
        )
        for condition in ("unsteered", f"{PERSONAS} personas"):
            out[f"{family}: persona-server {condition} / {peer}"] = (rate(condition) / by[(peer, n)], bar)
        if (f"{ours}, one persona, target", n) in by:
            out[f"{family}: one persona, target / one persona"] = (
                rate("one persona, target") / rate("one persona"),
                None,
            )
            out[f"{family}: unsteered, quiet rule / unsteered"] = (
                rate("unsteered, quiet rule") / rate("unsteered"),
                None,
            )
    return out


def upload_personas(url: str, models: list[str]) -> None:
    """p0..p15 on blocks 3 and 5, the same vectors for both models (they are the same weights)."""
    hidden = REFERENCE_SIZES["hidden_size"]
    for index in range(PERSONAS):
        layers = {block: random_vector(hidden, PERSONAS * index + block) for block in PERSONA_BLOCKS}
        for model in models:
            upload(url, f"p{index}", model, layers, 2.0, admin_key=None).raise_for_status()


def reference_server_args(work: Path, max_tokens: int) -> tuple[Path, Path, list[str]]:
    """The reference model built under ``work`` (an HF folder and its GGUF), and the arguments of a
    persona-server serving both."""
    model_dir = build_tiny_model(work / HF_MODEL, "llama", **REFERENCE_SIZES)
    gguf = convert_hf_to_gguf(model_dir, work / f"{HF_MODEL}.gguf")
    return (
        model_dir,
        gguf,
        [
            *["--model", str(model_dir), "--model", str(gguf), "--served-model-name", HF_MODEL],
            *["--served-model-name", GGUF_MODEL, "--data-dir", str(work / "data")],
            *["--max-tokens-cap", str(max_tokens)],
        ],
    )


def vllm_server_args(model_dir: Path, work: Path, max_tokens: int) -> list[str]:
    """The arguments of a persona-server serving the reference model's HF folder on vLLM."""
    return [
        *["--engine", "vllm", "--model", str(model_dir), "--served-model-name", HF_MODEL],
        *["--max-model-len", "2048", "--data-dir", str(work / "data-vllm")],
        *["--max-tokens-cap", str(max_tokens)],
    ]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, ExitStack() as servers:
        work = Path(folder)
        model_dir, gguf, ours_args = reference_server_args(work, args.max_tokens)
        ours = servers.enter_context(ServerProcess(ours_args, log_path=work / "persona-server.log"))
        hf_peer = servers.enter_context(
            transformers_server(model_dir, work / "transformers.log", args.transformers_cli)
        )
        gguf_peer = servers.enter_context(llama_cpp_server(gguf, GGUF_MODEL, work / "llama_cpp.log"))
        upload_personas(ours.url, [HF_MODEL, GGUF_MODEL])
        check_llama_cpp_runs_to_max_tokens(gguf_peer.url, GGUF_MODEL, args.max_tokens)
        if args.vllm:
            vllm_args = vllm_server_args(model_dir, work, args.max_tokens)
            vllm_log = work / "persona-server-vllm.log"
            ours_vllm = servers.enter_context(
                ServerProcess(vllm_args, env=VLLM_ENV, log_path=vllm_log, ready_timeout=600)
            )
            vllm_peer = servers.enter_context(vllm_server(model_dir, HF_MODEL, work / "vllm.log"))
            upload_personas(ours_vllm.url, [HF_MODEL])
        conditions = []
        for n in args.concurrency:
            if args.vllm:
                conditions += persona_conditions("vLLM", ours_vllm.url, HF_MODEL, n)
                conditions.append(Condition("vllm", vllm_peer.url, HF_MODEL, n, [{"ignore_eos": True}]))
            conditions += persona_conditions("HF", ours.url, HF_MODEL, n)
            conditions.append(Condition("transformers serve", hf_peer.url, str(model_dir), n, [{}]))
            conditions += persona_conditions("GGUF", ours.url, GGUF_MODEL, n)
            if args.closed_loop:
                conditions += closed_loop_conditions("HF", ours.url, HF_MODEL, n)
                conditions += closed_loop_conditions("GGUF", ours.url, GGUF_MODEL, n)
                if args.vllm:
                    conditions += closed_loop_conditions("vLLM", ours_vllm.url, HF_MODEL, n)
            conditions.append(
                Condition("llama_cpp.server", gguf_peer.url, GGUF_MODEL, n, [{}], count_usage=False)
            )
        await run_interleaved(conditions, args.rounds, args.requests, args.max_tokens)
    heading = (
        f"\nReference Llama (d=512, 8 blocks, head dim 64, float32; GGUF F32), {os.cpu_count()} cores, "
        f"{args.rounds} rounds x {args.requests} chat requests x {args.max_tokens} tokens, "
        "greedy\n"
    )
    measured = ratios(conditions) if TARGET_CONCURRENCY in args.concurrency else {}
    return report(conditions, measured, heading, args.json)


if __name__ == "__main__":
    parser = bench_parser(__doc__, rounds=3, requests=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, TARGET_CONCURRENCY])
    parser.add_argument("--vllm", action="store_true", help="add the vLLM engine and plain vLLM")
    parser.add_argument(
        "--closed-loop",
        action="store_true",
        help="add a persona_target and a never-firing rule (HF, GGUF, vLLM)",
    )
    parser.add_argument(
        "--transformers-cli",
        type=Path,
        default=None,
        help="the `transformers` script of another environment (the vllm extra pins transformers < 5.20)",
    )
    asyncio.run(main(parser.parse_args()))
