"""The load driver against a real server: counts, token totals and latency figures, failures reported."""

from __future__ import annotations

import argparse

from loadtests.load import run
from tests.api_helpers import API_KEY, LLAMA, metric
from tests.server_process import ServerProcess


def options(server: ServerProcess, **overrides: object) -> argparse.Namespace:
    values = {
        "base_url": f"{server.url}/v1", "api_key": API_KEY, "model": LLAMA, "num_prompts": 6,
        "concurrency": 3, "request_rate": 0.0, "max_tokens": 5, "temperature": 0.0, "seed": 0,
        "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    return argparse.Namespace(**{**values, **overrides})


async def test_the_driver_reports_what_the_server_did(server: ServerProcess) -> None:
    before = metric(server.url, "persona_server_generation_tokens_total", model=LLAMA, persona="none")
    summary = await run(options(server))
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (6, 0, 30)
    assert summary["output_token_throughput"] > 0
    assert 0 < summary["ttft_ms"]["p50"] <= summary["e2el_ms"]["p50"] <= summary["e2el_ms"]["p99"]
    after = metric(server.url, "persona_server_generation_tokens_total", model=LLAMA, persona="none")
    assert after - before == 30
    poisson = await run(options(server, concurrency=0, request_rate=50.0, num_prompts=4))
    assert poisson["completed"] == 4


async def test_failures_are_counted_with_their_reason(server: ServerProcess) -> None:
    summary = await run(options(server, model="no-such-model", num_prompts=2))
    assert (summary["completed"], summary["failed"]) == (0, 2)
    assert "NotFoundError" in summary["errors"][0]
