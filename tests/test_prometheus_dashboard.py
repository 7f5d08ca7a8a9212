"""Every query of the shipped Grafana dashboard returns data from a real Prometheus.

Debian's `prometheus` scrapes a real server with the shipped scrape config (its target pointed at
the test server's metrics port, its interval shortened); a typo in a query or a renamed metric
leaves a panel empty, and fails here.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from testkit.server_process import ServerProcess, free_port
from tests.api_helpers import chat, random_vector, upload, wait_until

# Real uvicorn and prometheus, waiting for its scrapes: about 15 s.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llama"
SCRAPE_INTERVAL = "1s"


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/persona-server.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def substitute_variables(expr: str) -> str:
    """Grafana's variables as Prometheus reads them: interval variables a window, the rest any value."""
    expr = re.sub(r"\$\{?__(rate_)?interval\}?", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def scrape_config(directory: Path, metrics_port: int) -> Path:
    """The shipped config with its one job's target replaced by the test server's metrics port."""
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    (job,) = config["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class PrometheusProcess:
    def __init__(self, config: Path, directory: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:  # never a silent skip: .ci/run installs it
            raise RuntimeError("prometheus is not installed; run the README's test command (.ci/run)")
        self.url = f"http://127.0.0.1:{free_port()}"
        self._command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
            "--log.level=warn",
        ]
        self._log = directory / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusProcess:
        log = open(self._log, "wb")
        self._process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 30, f"prometheus not ready; see {self._log}", interval=0.1)
        return self

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self._process.returncode}: {self._log.read_text()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=20)


@pytest.fixture(scope="module")
def scraped(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProcess]:
    """Prometheus after two rounds of load, each scraped: every rate has two samples to work with."""
    directory = tmp_path_factory.mktemp("prometheus")
    metrics_port = free_port()
    args = [
        *["--model", str(llama_dir), "--served-model-name", MODEL, "--data-dir", str(directory)],
        *["--metrics-port", str(metrics_port)],
    ]
    with (
        ServerProcess(args, log_path=directory / "server.log") as server,
        PrometheusProcess(scrape_config(directory, metrics_port), directory) as prometheus,
    ):
        stored = upload(server.url, "pirate", MODEL, {1: random_vector(64, 1)}, 4.0, admin_key=None)
        assert stored.status_code == 200, stored.text
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        finished = 0
        for _ in range(2):
            finished += drive_load(client, server.url)
            # Both rounds must land in separate scrapes for a rate over them to be more than zero.
            wait_until(
                lambda n=finished: scraped_requests(prometheus) == n,
                30,
                "no scrape saw the load",
                interval=0.1,
            )
        yield prometheus


def drive_load(client: openai.OpenAI, url: str) -> int:
    """Chat completions with and without a persona, streamed and not; returns how many finished.

    Each round also lists the personas: a store call in every round, whatever the persona cache
    serves, so the store's latency rate is never zero over the two rounds.
    """
    assert httpx.get(f"{url}/v1/personas").status_code == 200
    steering: list[dict[str, Any]] = [{}, {"persona": "pirate", "persona_monitor": ["pirate"]}]
    for extra in steering:
        for stream in (False, True):
            reply = chat(client, MODEL, max_tokens=4, stream=stream, **extra)
            if stream:
                for _ in reply:  # type: ignore[union-attr]
                    pass
    return 2 * len(steering)


def scraped_requests(prometheus: PrometheusProcess) -> float:
    result = prometheus.query("sum(persona_server_requests_total)")
    return float(result[0]["value"][1]) if result else 0.0


@pytest.mark.parametrize(("title", "expr"), dashboard_queries(), ids=lambda value: str(value)[:60])
def test_every_dashboard_query_returns_data(scraped: PrometheusProcess, title: str, expr: str) -> None:
    result = scraped.query(substitute_variables(expr))
    assert result, f"panel {title!r}: {expr} returned no series"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(value) for value in values), f"panel {title!r}: {expr} gave only {values}"


def test_the_scraped_target_is_the_servers_metrics_port(scraped: PrometheusProcess) -> None:
    (up,) = scraped.query('up{job="persona-server"}')
    assert up["value"][1] == "1"
