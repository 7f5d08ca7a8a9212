"""The served models by id, with per-model admission so that a flood gets 429s, not an endless queue,
and each model's engine state: serving, or down while the supervisor restarts it
(engine_supervisor.py), when its requests get 503s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.engine.base import Backend
from server.serving.errors import EngineRestarting, ModelExists, ModelNotFound, Overloaded


class ModelRegistry:
    def __init__(
        self,
        backends: dict[str, Backend],
        max_in_flight: int,
        parents: dict[str, str] | None = None,
        sources: dict[str, str | Path] | None = None,
    ) -> None:
        self._backends = backends
        self._max_in_flight = max_in_flight
        self._in_flight = dict.fromkeys(backends, 0)
        self._parents = dict(parents or {})
        self._sources = dict(sources or {})
        self._down: dict[str, str] = {}  # model -> why its engine cannot serve now

    @property
    def max_in_flight(self) -> int:
        """Places per model: batch rows plus queue."""
        return self._max_in_flight

    @property
    def ids(self) -> list[str]:
        return list(self._backends)

    @property
    def down(self) -> dict[str, str]:
        """The models whose engine cannot serve now, and why."""
        return dict(self._down)

    def get(self, model: str) -> Backend:
        """The model's engine; EngineRestarting (503) while it is down."""
        backend = self.engine(model)
        if model in self._down:
            raise EngineRestarting(model, self._down[model])
        return backend

    def engine(self, model: str) -> Backend:
        """The model's engine as registered, serving or not (the supervisor's view)."""
        try:
            return self._backends[model]
        except KeyError:
            raise ModelNotFound(model, self.ids) from None

    def source(self, model: str) -> str | Path | None:
        """Where the model was loaded from (to load it again), if known."""
        return self._sources.get(model)

    def parent(self, model: str) -> str | None:
        """The model a served model was made from (a baked persona's base), if any."""
        return self._parents.get(model)

    def add(
        self, model: str, backend: Backend, parent: str | None = None, source: str | Path | None = None
    ) -> None:
        """Serve one more model from now on (a persona just baked)."""
        if model in self._backends:
            raise ModelExists(model)
        self._backends[model] = backend
        self._in_flight.setdefault(model, 0)  # requests of a deleted namesake may still be leaving
        if parent is not None:
            self._parents[model] = parent
        if source is not None:
            self._sources[model] = source

    def mark_down(self, model: str, reason: str) -> None:
        """The model's engine cannot serve: its requests answer 503 with ``reason`` from now on."""
        if model in self._backends:  # a deleted model is nobody's concern
            self._down[model] = reason

    def replace(self, model: str, backend: Backend) -> Backend:
        """Serve the model from a new engine (a restarted one); returns the old one, to close."""
        old = self.engine(model)
        self._backends[model] = backend
        self._down.pop(model, None)
        return old

    async def remove(self, model: str, drain_seconds: float) -> Backend:
        """Stop serving the model (new requests get 404) and return its engine, to close, once its
        requests in flight have ended or ``drain_seconds`` have passed."""
        backend = self.engine(model)
        del self._backends[model]
        for known in (self._parents, self._sources, self._down):
            known.pop(model, None)
        deadline = time.monotonic() + drain_seconds
        while self._in_flight.get(model, 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if model not in self._backends and self._in_flight.get(model) == 0:  # else still counted
            del self._in_flight[model]
        return backend

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())

    @contextmanager
    def admit(self, model: str, places: int = 1) -> Iterator[None]:
        """Hold ``places`` of the model's in-flight places (batch rows plus queue: one per answer)
        for a request's lifetime."""
        if model not in self._backends:  # deleted since the request found it
            raise ModelNotFound(model, self.ids)
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
