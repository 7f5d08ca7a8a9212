"""The Redis store lists in a fixed number of round trips, however many personas and mappings it holds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from persona_store.mappings import MappingDraft
from persona_store.records import PersonaDraft
from persona_store.redis import RedisStore
from tests.redis_process import RedisProcess

pytestmark = [pytest.mark.integration, pytest.mark.redis]  # a real redis-server


class Sends:
    """Counts what the client sends to Redis: one send is one round trip (a pipeline is one send)."""

    def __init__(self) -> None:
        self.count = 0

    def connection_class(self) -> type[aioredis.Connection]:
        sends = self

        class CountingConnection(aioredis.Connection):
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                sends.count += 1
                await super().send_packed_command(command, check_health)

        return CountingConnection

    async def of(self, call: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
        """The round trips ``call`` takes, and what it returns."""
        before = self.count
        result = await call()
        return self.count - before, result


async def fill(store: RedisStore, models: int, names: int, mappings: int) -> None:
    rng = np.random.default_rng(models * 100 + names)
    for model in range(models):
        for name in range(names):
            for _ in range(2):  # two versions each: versions() has more than one to read
                vectors = {1: rng.standard_normal(8), 4: rng.standard_normal(8)}
                await store.put(
                    PersonaDraft(model=f"org/model-{model}", name=f"persona-{name}", vectors=vectors)
                )
    for _ in range(mappings):
        matrix = rng.standard_normal((8, 6))
        await store.put_mapping(MappingDraft("org/model-0", "org/model-1", {1: matrix}, {1: 2}))


async def test_listing_takes_the_same_few_round_trips_for_few_and_for_many(
    redis_server: RedisProcess,
) -> None:
    redis_server.flush()
    sends = Sends()
    client = aioredis.Redis.from_url(redis_server.url, connection_class=sends.connection_class())
    store = RedisStore(client)
    await client.ping()  # connect first: the connection's handshake is no part of what is measured
    reads: dict[str, Callable[[], Awaitable[Any]]] = {
        "list": store.list,
        "list one model": lambda: store.list("org/model-1"),
        "versions": lambda: store.versions("org/model-0", "persona-0"),
        "list_mappings": store.list_mappings,
    }

    await fill(store, models=2, names=1, mappings=1)
    few = {name: await sends.of(read) for name, read in reads.items()}
    await fill(store, models=6, names=8, mappings=12)  # the first two models' personas are rewritten
    many = {name: await sends.of(read) for name, read in reads.items()}

    assert [len(result) for _, result in few.values()] == [2, 1, 2, 1]
    assert [len(result) for _, result in many.values()] == [48, 8, 4, 13]
    trips = {name: count for name, (count, _) in few.items()}
    assert trips == {name: count for name, (count, _) in many.items()}
    assert trips == {"list": 4, "list one model": 3, "versions": 2, "list_mappings": 2}
    await store.close()
