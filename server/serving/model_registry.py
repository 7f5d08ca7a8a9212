"""The served models by id, with per-model admission so that a flood gets 429s, not an endless queue."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from server.engine.base import Backend
from server.serving.errors import ModelNotFound, Overloaded


class ModelRegistry:
    def __init__(self, backends: dict[str, Backend], max_in_flight: int) -> None:
        self._backends = backends
        self._max_in_flight = max_in_flight
        self._in_flight = dict.fromkeys(backends, 0)

    @property
    def max_in_flight(self) -> int:
        """Places per model: batch rows plus queue."""
        return self._max_in_flight

    @property
    def ids(self) -> list[str]:
        return list(self._backends)

    def get(self, model: str) -> Backend:
        try:
            return self._backends[model]
        except KeyError:
            raise ModelNotFound(model, self.ids) from None

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())

    @contextmanager
    def admit(self, model: str, places: int = 1) -> Iterator[None]:
        """Hold ``places`` of the model's in-flight places (batch rows plus queue: one per answer)
        for a request's lifetime."""
        if self._in_flight[model] + places > self._max_in_flight:
            raise Overloaded(model)
        self._in_flight[model] += places
        try:
            yield
        finally:
            self._in_flight[model] -= places

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
