"""The token traces of every closed-loop answer, taken from the workers in as few RPCs as possible.

Each loop answer needs its traces after each output of vLLM, and an RPC to the workers waits for the
engine's step to end: at concurrency 8, one RPC per answer was 8 RPCs per step. A ``TraceTaker`` has
at most one RPC out at a time; the answers that ask while it is out are served together by the next.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.engine.vllm.read_backs import Rpc

# (token, close): what one loop answer asks of the workers' persona_loop_take.
_Ask = tuple[str, bool]


class TraceTaker:
    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._asked: list[tuple[_Ask, asyncio.Future[list[list[Any]]]]] = []
        self._running: asyncio.Task[None] | None = None

    async def take(self, token: str, close: bool) -> list[list[Any]]:
        """The traces the loop ``token`` recorded since its last take (none when no worker holds it);
        ``close`` has the workers forget it."""
        future: asyncio.Future[list[list[Any]]] = asyncio.get_running_loop().create_future()
        self._asked.append(((token, close), future))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._serve())
        return await future

    async def _serve(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, []
            try:
                # Tensor-parallel workers run equal copies of a loop; with data parallelism one holds it.
                parts = await self._rpc("persona_loop_take", ([ask for ask, _ in asked],))
            except Exception as exc:  # every answer waiting on this RPC fails with it
                for _, future in asked:
                    if not future.done():
                        future.set_exception(exc)
                continue
            found: dict[str, list[list[Any]]] = {}
            for part in parts:
                for token, traces in (part or {}).items():
                    found.setdefault(token, traces)
            for ask, future in asked:
                if not future.done():  # its answer may have been cancelled meanwhile
                    future.set_result(found.get(ask[0], []))
