"""GGUF serving benchmark: persona-server (llama.cpp lanes) vs llama-cpp-python's own server.

Both serve the same GGUF F32 file of the project's reference model (a random-weight Llama, hidden
512, 8 blocks, 8 heads, intermediate 1408, vocab 400) on this machine, at the same time, driven by
the official openai client with the same chat prompts, max_tokens and greedy sampling, all conditions
interleaved (``loadtests/interleaved.py``):

- persona-server, unsteered;
- persona-server, steered with one persona for every request ("same persona");
- persona-server, steered with a different persona per request ("8 personas");
- llama_cpp.server, in the configuration PEERS.md gives, plus ``--interrupt_requests False``.

llama_cpp.server's non-streamed chat usage over-reports (43 completion tokens for max_tokens 32 on
this model, while its completions endpoint reports 32) and it does not stream usage: it is asked for
``min_tokens = max_tokens``, a warm-up request checks that it then ends by length, and each of its
requests counts max_tokens tokens.

    python -m loadtests.gguf_bench [--rounds 2] [--requests 16] [--max-tokens 64]
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from loadtests.bench_options import bench_parser
from loadtests.engine_bench import REFERENCE_SIZES
from loadtests.interleaved import Condition, report, run_interleaved
from loadtests.peers import check_llama_cpp_runs_to_max_tokens, llama_cpp_server
from server.gguf.model import convert_hf_to_gguf
from testkit.personas import random_vector, upload
from testkit.server_process import ServerProcess
from testkit.tiny_models import build_tiny_model

MODEL = "bench-llama"
PERSONAS = 8
CONCURRENCIES = (1, 4, 8)


def ratios(conditions: list[Condition]) -> dict[str, tuple[float, float]]:
    by = {(c.name, c.concurrency): c.tokens_per_second for c in conditions}
    out = {}
    for n in CONCURRENCIES:
        out[f"same persona / unsteered, c={n}"] = (
            by[("persona-server, same persona", n)] / by[("persona-server, unsteered", n)],
            0.97,
        )
    out["8 personas / unsteered, c=8"] = (
        by[("persona-server, 8 personas", 8)] / by[("persona-server, unsteered", 8)],
        0.97,
    )
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
        ours_args = [
            *["--model", str(gguf), "--served-model-name", MODEL, "--data-dir", str(work / "data")],
            *["--max-tokens-cap", str(max_tokens)],
        ]
        with (
            ServerProcess(ours_args, log_path=work / "persona-server.log") as ours,
            llama_cpp_server(gguf, MODEL, work / "llama_cpp.log") as peer,
        ):
            for index in range(PERSONAS):  # blocks 3 and 5 of 8, a different vector each
                layers = {3: random_vector(512, 2 * index), 5: random_vector(512, 2 * index + 1)}
                upload(ours.url, f"p{index}", MODEL, layers, 2.0, admin_key=None).raise_for_status()
            check_llama_cpp_runs_to_max_tokens(peer.url, MODEL, max_tokens)
            plain = {"ignore_eos": True}
            conditions = []
            for n in CONCURRENCIES:
                conditions += [
                    Condition("persona-server, unsteered", ours.url, MODEL, n, [plain]),
                    Condition(
                        "persona-server, same persona", ours.url, MODEL, n, [{**plain, "persona": "p0"}]
                    ),
                    Condition(
                        "persona-server, 8 personas",
                        ours.url,
                        MODEL,
                        n,
                        [{**plain, "persona": f"p{i}"} for i in range(PERSONAS)],
                    ),
                    Condition("llama_cpp.server", peer.url, MODEL, n, [{}], count_usage=False),
                ]
            await run_interleaved(conditions, rounds, requests, max_tokens)
    heading = (
        f"\nGGUF F32 reference Llama (d=512, 8 blocks), {os.cpu_count()} cores, {rounds} rounds x "
        f"{requests} chat requests x {max_tokens} tokens, greedy\n"
    )
    report(conditions, ratios(conditions), heading, json_out)


if __name__ == "__main__":
    args = bench_parser(__doc__, rounds=2, requests=16).parse_args()
    asyncio.run(main(args.rounds, args.requests, args.max_tokens, args.json))
