"""Helpers of the tests: the test server's keys and models, persona uploads, metric reads, and the one
way to wait for something (a condition, a job, a running stream)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.steering.plan import Positions, SteeringPlan
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


def wait_until(condition: Callable[[], object], timeout: float, message: str, interval: float = 0.05) -> None:
    """Ask ``condition()`` until it holds. ``timeout`` only ends a test that would otherwise hang: it
    is no claim of how fast the condition comes true (then ``message`` says what never happened)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], object], timeout: float, message: str, interval: float = 0.01
) -> None:
    """``wait_until`` on an event loop: ``condition()`` may return a bool or an awaitable of one."""
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, message
        await asyncio.sleep(interval)


def finished_job(
    base_url: str,
    status_url: str,
    headers: dict[str, str] | None = None,
    timeout: float = 240,
    seen: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll a job's status (``status_url``, as /admin/jobs/{id}) until it is neither queued nor
    running; return it. ``seen`` is called with every status read, e.g. to check its progress."""
    job: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal job
        job = httpx.get(f"{base_url}{status_url}", headers=headers, timeout=30).json()
        if seen is not None:
            seen(job)
        return job["status"] not in ("queued", "running")

    wait_until(finished, timeout, f"the job at {status_url} did not finish in {timeout} s", interval=0.2)
    return job


def running_stream(client: openai.OpenAI, model: str, max_tokens: int = 400) -> Any:
    """A greedy streamed answer that has sent its first chunk and has long to go (it ignores EOS)."""
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    return stream


async def alone_and_together(
    backend: Any, requests: list[Any]
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """The token ids an engine answers each request with alone (one after another), then with all of
    them at once; and, for the second, which request each chunk belonged to, in order of arrival."""

    async def tokens(index: int, arrivals: list[int]) -> list[int]:
        ids: list[int] = []
        async for chunk in backend.generate(requests[index]):
            arrivals.append(index)
            ids += chunk.token_ids
        return ids

    alone = [await tokens(index, []) for index in range(len(requests))]
    arrivals: list[int] = []
    together = await asyncio.gather(*(tokens(index, arrivals) for index in range(len(requests))))
    return alone, list(together), arrivals


def chat(client: openai.OpenAI, model: str, **fields: Any) -> Any:
    """A chat completion of QUESTION: greedy, 10 tokens with EOS ignored, unless ``fields`` say
    otherwise. Fields the openai client has no argument for travel in extra_body, as a client of
    vLLM sends them."""
    fields = {"max_tokens": 10, "temperature": 0, "ignore_eos": True, **fields}
    return _create(client.chat.completions.create, fields, model=model, messages=QUESTION)


def complete(client: openai.OpenAI, model: str, prompt: str | list[str], **fields: Any) -> Any:
    """A text completion of ``prompt``, as ``chat`` asks (6 tokens)."""
    fields = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, **fields}
    return _create(client.completions.create, fields, model=model, prompt=prompt)


def _create(create: Callable[..., Any], fields: dict[str, Any], **asked: Any) -> Any:
    named = inspect.signature(create).parameters
    native = {name: value for name, value in fields.items() if name in named}
    extra = {name: value for name, value in fields.items() if name not in named}
    return create(**asked, **native, extra_body=extra)


def random_plan(
    seed: int, blocks: list[int], strength: float, positions: Positions, hidden: int = 64
) -> SteeringPlan:
    """A persona of random vectors (seeded) on ``blocks`` of a tiny model: the engine tests' persona."""
    generator = torch.Generator().manual_seed(seed)
    vectors = {block: torch.randn(hidden, generator=generator) for block in blocks}
    return SteeringPlan(vectors, strength=strength, positions=positions)
