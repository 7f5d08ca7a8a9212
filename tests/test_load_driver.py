"""The load driver against a real server: counts, token totals and latency figures, failures reported.

The driver runs as its users run it, `python -m loadtests.load ... --json FILE`: the tests read the
summary it writes and never import the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.server_process import ServerProcess
from tests.api_helpers import API_KEY, LLAMA, metric

# The load driver in a subprocess: seconds a test.
pytestmark = [pytest.mark.integration, pytest.mark.llama_cpp, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]  # `-m loadtests.load` resolves from here


def driver_command(server: ServerProcess, summary: Path, **overrides: object) -> list[str]:
    options: dict[str, object] = {
        "base-url": f"{server.url}/v1",
        "api-key": API_KEY,
        "model": LLAMA,
        "num-prompts": 6,
        "concurrency": 3,
        "request-rate": 0.0,
        "max-tokens": 5,
        "temperature": 0.0,
        "seed": 0,
        "extra-body": {"ignore_eos": True},
        "json": summary,
    }
    options.update({name.replace("_", "-"): value for name, value in overrides.items()})
    command = [sys.executable, "-m", "loadtests.load"]
    for name, value in options.items():
        command += [f"--{name}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return command


def drive(server: ServerProcess, tmp_path: Path, **overrides: object) -> dict[str, Any]:
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        driver_command(server, summary, **overrides), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"completed {json.loads(summary.read_text())['completed']}" in done.stdout  # the printed report
    return json.loads(summary.read_text())


def test_the_driver_reports_what_the_server_did(server: ServerProcess, tmp_path: Path) -> None:
    before = metric(server.url, "persona_server_generation_tokens_total", model=LLAMA, persona="none")
    summary = drive(server, tmp_path)
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (6, 0, 30)
    assert summary["output_token_throughput"] > 0
    assert 0 < summary["ttft_ms"]["p50"] <= summary["e2el_ms"]["p50"] <= summary["e2el_ms"]["p99"]
    after = metric(server.url, "persona_server_generation_tokens_total", model=LLAMA, persona="none")
    assert after - before == 30
    poisson = drive(server, tmp_path, concurrency=0, request_rate=50.0, num_prompts=4)
    assert poisson["completed"] == 4


def test_failures_are_counted_with_their_reason(server: ServerProcess, tmp_path: Path) -> None:
    summary = drive(server, tmp_path, model="no-such-model", num_prompts=2)
    assert (summary["completed"], summary["failed"]) == (0, 2)
    assert "NotFoundError" in summary["errors"][0]


# Every family the operator's dashboard reads (issue: metrics completeness), by its exposed name.
OPERATOR_FAMILIES = {
    "persona_server_request_latency_seconds",
    "persona_server_time_to_first_token_seconds",
    "persona_server_inter_token_latency_seconds",
    "persona_server_queue_time_seconds",
    "persona_server_prompt_tokens",
    "persona_server_generation_tokens",
    "persona_server_requests",
    "persona_server_requests_running",
    "persona_server_requests_waiting",
    "persona_server_store_latency_seconds",
    "persona_server_store_errors",
    "persona_server_store_cache_lookups",
    "persona_server_persona_score",
}


async def test_metrics_show_the_load_while_the_driver_runs(
    server: ServerProcess, personas: Any, tmp_path: Path
) -> None:
    """Scrape /metrics during a steered, monitored run: the load shows up live and every family is there."""
    labels = {"model": LLAMA, "persona": "pirate"}
    # Answers long enough to be in flight across several scrapes: with 40 tokens a warm server
    # finished all eight between two scrapes once (seen in .ci/run), and the gauge read 0 throughout.
    queued_before = metric(server.url, "persona_server_queue_time_seconds_count", **labels)
    extra = {"ignore_eos": True, "persona": "pirate", "persona_monitor": ["pirate"]}
    summary_path = tmp_path / "summary.json"
    command = driver_command(
        server, summary_path, num_prompts=8, concurrency=4, max_tokens=200, extra_body=extra
    )
    log = tmp_path / "driver.log"
    with log.open("wb") as output:
        driver = await asyncio.create_subprocess_exec(*command, stdout=output, stderr=output, cwd=REPO)
    exited = asyncio.create_task(driver.wait())
    running_seen, families = 0.0, {}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as scraper:
        while not exited.done():
            families = {
                f.name: f for f in text_string_to_metric_families((await scraper.get("/metrics")).text)
            }
            running = [
                s.value
                for s in families["persona_server_requests_running"].samples
                if s.labels.get("model") == LLAMA
            ]
            running_seen = max(running_seen, *running, 0.0)
            await asyncio.sleep(0.02)
    assert exited.result() == 0, log.read_text()[-3000:]
    summary = json.loads(summary_path.read_text())
    assert (summary["completed"], summary["failed"]) == (8, 0)
    assert running_seen >= 1  # the scrape saw requests in flight
    assert set(families) >= OPERATOR_FAMILIES  # scraped during the run
    assert metric(server.url, "persona_server_queue_time_seconds_count", **labels) == queued_before + 8
    assert metric(server.url, "persona_server_persona_score_count", model=LLAMA, persona="pirate") >= 8
