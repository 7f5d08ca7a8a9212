"""Locust soak test for any OpenAI-compatible endpoint: streamed chat requests, personas optional.

Each simulated user sends streamed chat completions with a pause between them. Locust times a
streamed POST (``chat``) up to its response headers only, so this file adds ``time to first token``
(to the first chunk carrying content), ``inter-token`` and ``end to end`` entries: the web UI and
the CSV show TTFT, ITL and E2E latency over hours. A request that fails, or a stream that ends
without a finish reason, is a failure.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 1h \\
        --csv soak    # environment: MODEL (required), PERSONAS (comma-separated, optional),
                      # MAX_TOKENS (64), API_KEY, MONITOR=1 to ask persona_monitor for the persona

Request i of a user carries persona PERSONAS[i mod len] (none when PERSONAS is empty), so a soak run
mixes personas in every batch, as real traffic does.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # loadtests is not installed: the repo root
from loadtests.load import PROMPTS


def _body(prompt: str, persona: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": os.environ["MODEL"],
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": int(os.environ.get("MAX_TOKENS", "64")),
        "stream": True,
    }
    if persona:
        body["persona"] = persona
        if os.environ.get("MONITOR") == "1":
            body["persona_monitor"] = [persona]
    return body


class ChatUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        personas = [name for name in os.environ.get("PERSONAS", "").split(",") if name]
        self._personas = itertools.cycle(personas or [None])
        self._random = random.Random()
        self._headers = {"Authorization": f"Bearer {os.environ.get('API_KEY', 'none')}"}

    def _record(self, name: str, seconds: float, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=seconds * 1000,
            response_length=length,
            exception=None,
            context={},
        )

    @task
    def chat(self) -> None:
        body = _body(self._random.choice(PROMPTS), next(self._personas))
        start = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self._headers,
            stream=True,
            catch_response=True,
            name="chat",
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            finish, previous = None, None
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[len(b"data: ") :])
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") is not None or choice.get("finish_reason"):
                        now = time.perf_counter()
                        if previous is None:
                            self._record("time to first token", now - start)
                        else:
                            self._record("inter-token", now - previous)
                        previous = now
                    finish = choice.get("finish_reason") or finish
            if finish is None:
                response.failure("the stream ended without a finish reason")
            else:
                response.success()
                self._record("end to end", time.perf_counter() - start)
