"""The served models by id, with per-model admission so that a flood gets 429s, not an endless queue."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from server.engine.base import Backend
from server.serving.errors import ModelExists, ModelNotFound, Overloaded


class ModelRegistry:
    def __init__(
        self, backends: dict[str, Backend], max_in_flight: int, parents: dict[str, str] | None = None
    ) -> None:
        self._backends = backends
        self._max_in_flight = max_in_flight
        self._in_flight = dict.fromkeys(backends, 0)
        self._parents = dict(parents or {})

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

    def parent(self, model: str) -> str | None:
        """The model a served model was made from (a baked persona's base), if any."""
        return self._parents.get(model)

    def add(self, model: str, backend: Backend, parent: str | None = None) -> None:
        """Serve one more model from now on (a persona just baked)."""
        if model in self._backends:
            raise ModelExists(model)
        self._backends[model] = backend
        self._in_flight[model] = 0
        if parent is not None:
            self._parents[model] = parent

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
