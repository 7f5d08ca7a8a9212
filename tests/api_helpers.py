"""Helpers of the API tests: the test server's keys and models, persona uploads, metric reads."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from testkit import personas
from testkit.personas import random_vector  # noqa: F401 - the tests take it from here

ADMIN_KEY = "admin-secret"
API_KEY = "api-secret"
LLAMA, QWEN = "tiny-llama", "tiny-qwen"
GGUF = "tiny-llama-gguf"  # the tiny Llama's very weights, served by llama.cpp
QUESTION = [{"role": "user", "content": "tell me about the sea"}]


# The shared upload, with the test server's admin key unless a test says otherwise (admin_key=None).
upload = functools.partial(personas.upload, admin_key=ADMIN_KEY)


def metric(base_url: str, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def assert_openai_error(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


class HealthProbe:
    """Asks /health over and over on a thread and keeps the slowest answer's time."""

    def __init__(self, server: Any) -> None:  # anything with the server's url
        self._url = f"{server.url}/health"
        self.slowest = 0.0
        self.answers = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def _probe(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    answered = client.get(self._url).status_code == 200
                except httpx.HTTPError:  # a timeout is the slowest answer of all
                    answered = False
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.answers += answered
                self.failures += not answered
                time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
