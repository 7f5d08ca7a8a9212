"""The load driver against a real server: counts, token totals and latency figures, failures reported."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

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


# Every family the operator's dashboard reads (issue: metrics completeness), by its exposed name.
OPERATOR_FAMILIES = {
    "persona_server_request_latency_seconds", "persona_server_time_to_first_token_seconds",
    "persona_server_inter_token_latency_seconds", "persona_server_queue_time_seconds",
    "persona_server_prompt_tokens", "persona_server_generation_tokens", "persona_server_requests",
    "persona_server_requests_running", "persona_server_requests_waiting",
    "persona_server_store_latency_seconds", "persona_server_store_errors",
    "persona_server_store_cache_lookups", "persona_server_persona_score",
}  # fmt: skip


async def test_metrics_show_the_load_while_the_driver_runs(server: ServerProcess, personas: Any) -> None:
    """Scrape /metrics during a steered, monitored run: the load shows up live and every family is there."""
    labels = {"model": LLAMA, "persona": "pirate"}
    queued_before = metric(server.url, "persona_server_queue_time_seconds_count", **labels)
    extra = {"ignore_eos": True, "persona": "pirate", "persona_monitor": ["pirate"]}
    driver = asyncio.create_task(
        run(options(server, num_prompts=8, concurrency=4, max_tokens=40, extra_body=extra))
    )
    running_seen, families = 0.0, {}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as scraper:
        while not driver.done():
            families = {
                f.name: f for f in text_string_to_metric_families((await scraper.get("/metrics")).text)
            }
            running = [s.value for s in families["persona_server_requests_running"].samples
                       if s.labels.get("model") == LLAMA]  # fmt: skip
            running_seen = max(running_seen, *running, 0.0)
            await asyncio.sleep(0.02)
    summary = driver.result()
    assert (summary["completed"], summary["failed"]) == (8, 0)
    assert running_seen >= 1  # the scrape saw requests in flight
    assert set(families) >= OPERATOR_FAMILIES  # scraped during the run
    assert metric(server.url, "persona_server_queue_time_seconds_count", **labels) == queued_before + 8
    assert metric(server.url, "persona_server_persona_score_count", model=LLAMA, persona="pirate") >= 8
