"""Engines that die come back by themselves: the supervisor watches every served model's engine,
marks a dead one down (its requests answer 503, /ready names it), loads it again with back-off, and
serves from the new engine. Personas need no re-registration: engines receive vectors with each
request and keep only caches of them (vLLM's resident sets fill again on demand).

Restarts are bounded: an engine that dies more than ``max_restarts`` times within ``window_seconds``
is in a crash loop that a restart will not cure, so it stays down and /ready keeps saying so, for an
orchestrator to replace the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.engine.base import Backend
from server.serving.model_registry import ModelRegistry

logger = logging.getLogger(__name__)

Loader = Callable[[str], Awaitable[Backend]]  # served model id -> a new engine for it


@dataclass(frozen=True)
class RestartPolicy:
    poll_seconds: float = 0.5
    first_delay_seconds: float = 1.0  # before the first try of a restart; doubled before each next
    tries: int = 5
    max_restarts: int = 5  # deaths per window that are restarted
    window_seconds: float = 600.0
    close_timeout_seconds: float = 30.0  # for the dead engine to release what it holds

    @property
    def backoff_seconds(self) -> list[float]:
        return [self.first_delay_seconds * 2**attempt for attempt in range(self.tries)]


class EngineSupervisor:
    def __init__(
        self,
        registry: ModelRegistry,
        load: Loader,
        on_death: Callable[[str], None] = lambda _model: None,
        on_restart: Callable[[str], None] = lambda _model: None,
        policy: RestartPolicy | None = None,
    ) -> None:
        self._registry = registry
        self._load = load
        self._on_death, self._on_restart = on_death, on_restart
        self._policy = policy or RestartPolicy()
        self._deaths: dict[str, deque[float]] = {}
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._given_up: set[str] = set()
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._watch_engines(), name="engine-supervisor")

    async def _watch_engines(self) -> None:
        while True:
            for model in self._registry.ids:
                if model in self._restarts or model in self._given_up:
                    continue
                reason = self._registry.engine(model).failure()
                if reason is not None:
                    self._died(model, reason)
            await asyncio.sleep(self._policy.poll_seconds)

    def _died(self, model: str, reason: str) -> None:
        logger.error("the engine of model %s died: %s", model, reason)
        self._on_death(model)
        now = time.monotonic()
        deaths = self._deaths.setdefault(model, deque())
        deaths.append(now)
        while deaths and deaths[0] < now - self._policy.window_seconds:
            deaths.popleft()
        if len(deaths) > self._policy.max_restarts:
            self._registry.mark_down(
                model,
                f"{reason}; it died {len(deaths)} times in {self._policy.window_seconds:.0f} s, "
                "so it is not restarted again",
            )
            logger.error("model %s: giving up after %d deaths", model, len(deaths))
            self._given_up.add(model)
            return
        self._registry.mark_down(model, reason)
        self._restarts[model] = asyncio.create_task(self._restart(model, reason), name=f"restart-{model}")

    async def _restart(self, model: str, reason: str) -> None:
        await self._close(self._registry.engine(model))
        for attempt, delay in enumerate(self._policy.backoff_seconds, start=1):
            await asyncio.sleep(delay)
            try:
                engine = await self._load(model)
            except Exception as exc:
                logger.exception("model %s: restart %d failed", model, attempt)
                self._registry.mark_down(model, f"{reason}; restart {attempt} failed: {exc}")
                continue
            del self._restarts[model]  # watched again
            if model not in self._registry.ids:  # deleted (a baked model) while it was down
                await self._close(engine)
                return
            self._registry.replace(model, engine)
            self._on_restart(model)
            logger.info("model %s: the engine serves again (restart %d)", model, attempt)
            return
        self._registry.mark_down(model, f"{reason}; {len(self._policy.backoff_seconds)} restarts failed")
        self._given_up.add(model)

    async def _close(self, engine: Backend) -> None:
        """Let the dead engine release what it holds (its scheduler thread, vLLM's processes)."""
        try:
            await asyncio.wait_for(engine.close(), self._policy.close_timeout_seconds)
        except Exception:
            logger.exception("closing a dead engine failed")

    async def close(self) -> None:
        tasks = [task for task in (self._watch, *self._restarts.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
