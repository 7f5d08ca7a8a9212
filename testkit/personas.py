"""Random persona vectors and their upload through a running server's admin API."""

from __future__ import annotations

import random
from typing import Any

import httpx


def random_vector(size: int, seed: int) -> list[float]:
    """A reproducible Gaussian vector: the same seed gives the same persona in every run."""
    rng = random.Random(seed)
    return [rng.gauss(0.0, 1.0) for _ in range(size)]


def upload(
    base_url: str,
    name: str,
    model: str,
    layers: dict[int, list[float]],
    default_strength: float = 1.0,
    admin_key: str | None = None,
    if_match: int | None = None,
    **extra: Any,
) -> httpx.Response:
    """PUT /admin/personas/{name}; with no ``admin_key``, no Authorization header (a loopback client)."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    if if_match is not None:
        headers["If-Match"] = str(if_match)
    body = {
        "model": model,
        "layers": {str(k): v for k, v in layers.items()},
        "default_strength": default_strength,
    }
    return httpx.put(f"{base_url}/admin/personas/{name}", json={**body, **extra}, headers=headers, timeout=30)
