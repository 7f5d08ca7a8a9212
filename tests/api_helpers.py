"""Helpers of the API tests: persona uploads, metric reads."""

from __future__ import annotations

import random
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ADMIN_KEY = "admin-secret"
API_KEY = "api-secret"
LLAMA, QWEN = "tiny-llama", "tiny-qwen"
GGUF = "tiny-llama-gguf"  # the tiny Llama's very weights, served by llama.cpp
QUESTION = [{"role": "user", "content": "tell me about the sea"}]


def random_vector(size: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0.0, 1.0) for _ in range(size)]


def upload(
    base_url: str,
    name: str,
    model: str,
    layers: dict[int, list[float]],
    default_strength: float = 1.0,
    admin_key: str | None = ADMIN_KEY,
    if_match: int | None = None,
    **extra: Any,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    if if_match is not None:
        headers["If-Match"] = str(if_match)
    body = {
        "model": model,
        "layers": {str(k): v for k, v in layers.items()},
        "default_strength": default_strength,
    }
    return httpx.put(f"{base_url}/admin/personas/{name}", json={**body, **extra}, headers=headers, timeout=30)


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
