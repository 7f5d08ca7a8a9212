"""The in-process persona cache over a real Redis: hits, cross-replica updates, outages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from persona_store.cache import CachingStore
from persona_store.errors import StoreUnavailable
from persona_store.records import PersonaDraft
from persona_store.redis import RedisStore
from tests.redis_process import RedisProcess


def draft(name: str, seed: int) -> PersonaDraft:
    return PersonaDraft(model="m", name=name, vectors={1: np.random.default_rng(seed).standard_normal(8)})


async def test_hits_and_a_write_elsewhere_is_seen_within_the_check_interval(
    redis_server: RedisProcess,
) -> None:
    redis_server.flush()
    here = CachingStore(RedisStore.from_url(redis_server.url), check_interval=0.3)
    other_replica = RedisStore.from_url(redis_server.url)
    await other_replica.put(draft("pirate", 1))
    first = await here.get("m", "pirate")
    assert (await here.get("m", "pirate")) is first and (here.hits, here.misses) == (1, 1)
    await other_replica.put(draft("pirate", 2))
    await asyncio.sleep(0.35)
    assert (await here.get("m", "pirate")).info.version == 2
    await here.close()
    await other_replica.close()


async def test_cached_personas_survive_an_outage_uncached_ones_fail(tmp_path: Path) -> None:
    own = RedisProcess(tmp_path, appendonly=True).start()
    try:
        writer = RedisStore.from_url(own.url)
        await writer.put(draft("pirate", 1))
        await writer.put(draft("formal", 2))
        cache = CachingStore(RedisStore.from_url(own.url), check_interval=0.0)
        served = await cache.get("m", "pirate")
        own.stop()
        assert (await cache.get("m", "pirate")) is served
        with pytest.raises(StoreUnavailable):
            await cache.get("m", "formal")
        own.start()
        assert (await cache.get("m", "formal")).info.name == "formal"
        await cache.close()
        await writer.close()
    finally:
        own.stop()
