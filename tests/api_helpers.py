"""Helpers of the API tests: the test server's keys and models, persona uploads, metric reads."""

from __future__ import annotations

import functools
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.testing import personas
from server.testing.personas import random_vector  # noqa: F401 - the tests take it from here

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
