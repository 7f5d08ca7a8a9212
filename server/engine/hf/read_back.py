"""Answers read back through the model (persona monitoring), batched between decode steps.

Requests that finish together (a burst ends on the same step) ask for their read-backs together; the
first one schedules a drain on the scheduler thread, and by the time it runs the others are queued
too, so they share padded forward passes instead of each taking its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.hf.runner import ModelRunner


@dataclass
class _ReadBack:
    tokens: list[int]
    start: int  # the first response position
    num_blocks: int
    result: Future[torch.Tensor] = field(default_factory=Future)


class ReadBackBatcher:
    def __init__(
        self, runner: ModelRunner, run_on_model: Callable[[Callable[[], Any]], Future[Any]], max_tokens: int
    ) -> None:
        self._runner = runner
        self._run_on_model = run_on_model
        self._max_tokens = max_tokens  # padded tokens of one forward pass
        self._lock = threading.Lock()
        self._pending: list[_ReadBack] = []

    def submit(self, tokens: list[int], start: int, num_blocks: int) -> Future[torch.Tensor]:
        """Mean outputs of blocks ``0..num_blocks-1`` over ``tokens[start:]``, unsteered: [num_blocks, d]."""
        item = _ReadBack(tokens, start, num_blocks)
        with self._lock:
            self._pending.append(item)
            first = len(self._pending) == 1
        if first:
            self._run_on_model(self._drain)
        return item.result

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        pending.sort(key=lambda item: len(item.tokens))  # similar lengths pad little
        group: list[_ReadBack] = []
        for item in pending:
            if group and len(item.tokens) * (len(group) + 1) > self._max_tokens:
                self._run(group)
                group = []
            group.append(item)
        if group:
            self._run(group)

    def _run(self, group: list[_ReadBack]) -> None:
        num_blocks = max(item.num_blocks for item in group)
        try:
            means = self._runner.response_means(
                [item.tokens for item in group], [item.start for item in group], num_blocks
            )
        except Exception as exc:
            for item in group:
                item.result.set_exception(exc)
            return
        for row, item in enumerate(group):
            item.result.set_result(means[row, : item.num_blocks])
