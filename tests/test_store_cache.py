"""The in-process persona cache over a real Redis: hits, cross-replica updates, outages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis.asyncio

from persona_store.cache import CachingStore
from persona_store.errors import PersonaNotFound, StoreUnavailable
from persona_store.records import PersonaDraft
from persona_store.redis import KEY_PREFIX, RedisStore
from tests.api_helpers import wait_until_async
from tests.redis_process import RedisProcess

pytestmark = [pytest.mark.integration, pytest.mark.redis]  # real redis-servers


def draft(name: str, seed: int) -> PersonaDraft:
    return PersonaDraft(model="m", name=name, vectors={1: np.random.default_rng(seed).standard_normal(8)})


class SteppedClock:
    """A monotonic clock that moves only when the test moves it: intervals without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_hits_and_a_write_elsewhere_is_seen_within_the_check_interval(
    redis_server: RedisProcess,
) -> None:
    redis_server.flush()
    clock = SteppedClock()
    here = CachingStore(RedisStore.from_url(redis_server.url), check_interval=0.3, clock=clock)
    other_replica = RedisStore.from_url(redis_server.url)
    await other_replica.put(draft("pirate", 1))
    first = await here.get("m", "pirate")
    assert (await here.get("m", "pirate")) is first and (here.hits, here.misses) == (1, 1)
    await other_replica.put(draft("pirate", 2))
    clock.now += 0.29  # still within the interval: the cached version, without asking the store
    assert (await here.get("m", "pirate")) is first
    clock.now += 0.02  # past it: the version probe finds the write made elsewhere
    assert (await here.get("m", "pirate")).info.version == 2
    await here.close()
    await other_replica.close()


@pytest.mark.integration  # starts its own redis-server
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


@pytest.mark.integration  # starts its own redis-server
async def test_a_write_that_fails_in_an_outage_keeps_the_persona_serving(tmp_path: Path) -> None:
    """A PUT or DELETE that answers 503 changes nothing, the cache included: the persona it meant to
    change is still served from the cache while Redis is down."""
    own = RedisProcess(tmp_path, appendonly=True).start()
    try:
        writer = RedisStore.from_url(own.url)
        await writer.put(draft("pirate", 1))
        cache = CachingStore(RedisStore.from_url(own.url), check_interval=0.0)
        served = await cache.get("m", "pirate")
        own.stop()
        with pytest.raises(StoreUnavailable):
            await cache.put(draft("pirate", 2))
        with pytest.raises(StoreUnavailable):
            await cache.delete("m", "pirate")
        assert (await cache.get("m", "pirate")) is served
        own.start()
        assert (await cache.get("m", "pirate")).info.version == served.info.version
        await cache.close()
        await writer.close()
    finally:
        own.stop()


async def test_pub_sub_drops_a_cached_persona_at_once_when_another_replica_writes(
    redis_server: RedisProcess,
) -> None:
    redis_server.flush()
    # No version probe for an hour: only the change feed can make the new version visible.
    here = CachingStore(RedisStore.from_url(redis_server.url), check_interval=3600, heal_interval=3600)
    other_replica = RedisStore.from_url(redis_server.url)
    here.start()
    await other_replica.put(draft("pirate", 1))
    assert (await here.get("m", "pirate")).info.version == 1
    await wait_until_async(lambda: here.feed_live, 30, "the change feed is not live")

    await other_replica.put(draft("pirate", 2))
    # The probes wait an hour, so only the feed can bring version 2 before the deadline ends a hung
    # test: how fast it arrives is a benchmark's question, not this test's.
    await wait_until_async(lambda: version_of(here, "pirate", 2), 30, "version 2 never reached this replica")
    await other_replica.delete("m", "pirate")
    await wait_until_async(lambda: is_gone(here, "pirate"), 30, "the deleted persona is still served here")
    await here.close()
    await other_replica.close()


async def version_of(cache: CachingStore, name: str, version: int) -> bool:
    return (await cache.get("m", name)).info.version == version


async def is_gone(cache: CachingStore, name: str) -> bool:
    try:
        await cache.get("m", name)
    except PersonaNotFound:
        return True
    return False


async def test_a_lost_change_message_is_healed_by_the_version_probe(redis_server: RedisProcess) -> None:
    redis_server.flush()
    here = CachingStore(RedisStore.from_url(redis_server.url), check_interval=3600, heal_interval=0.3)
    here.start()
    writer = RedisStore.from_url(redis_server.url)
    await writer.put(draft("pirate", 1))
    await writer.put(draft("pirate", 2))
    await wait_until_async(lambda: here.feed_live, 30, "the change feed is not live")
    assert (await here.get("m", "pirate")).info.version == 2
    # Move the current version back to 1 behind pub/sub's back, as if its message were lost.
    raw = redis.asyncio.Redis.from_url(redis_server.url)
    await raw.set(f"{KEY_PREFIX}:cur:m:pirate", 1)
    assert (await here.get("m", "pirate")).info.version == 2  # nothing told the cache yet
    await wait_until_async(lambda: version_of(here, "pirate", 1), 30, "version 1 never reached this replica")
    await raw.aclose()
    await here.close()
    await writer.close()


async def test_a_broken_subscription_resubscribes_and_probes_everything_cached(
    redis_server: RedisProcess,
) -> None:
    redis_server.flush()
    here = CachingStore(
        RedisStore.from_url(redis_server.url), check_interval=3600, heal_interval=3600, resubscribe_delay=0.2
    )
    here.start()
    writer = RedisStore.from_url(redis_server.url)
    await writer.put(draft("pirate", 1))
    await wait_until_async(lambda: here.feed_live, 30, "the change feed is not live")
    assert (await here.get("m", "pirate")).info.version == 1
    raw = redis.asyncio.Redis.from_url(redis_server.url)
    await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await wait_until_async(
        lambda: not here.feed_live, 30, "the change feed did not notice the lost connection"
    )
    await writer.put(draft("pirate", 2))  # published while nobody listens: this message is lost
    await wait_until_async(lambda: here.feed_live, 30, "the change feed is not live")
    assert (await here.get("m", "pirate")).info.version == 2
    await raw.aclose()
    await here.close()
    await writer.close()


@pytest.mark.integration  # starts its own redis-server
async def test_calls_succeed_as_soon_as_redis_is_back(tmp_path: Path) -> None:
    own = RedisProcess(tmp_path, appendonly=True).start()
    try:
        here = CachingStore(RedisStore.from_url(own.url), resubscribe_delay=0.2)
        here.start()
        await wait_until_async(lambda: here.feed_live, 30, "the change feed is not live")
        await here.put(draft("pirate", 1))
        own.stop()
        await wait_until_async(
            lambda: not here.feed_live, 30, "the change feed did not notice the lost connection"
        )
        with pytest.raises(StoreUnavailable):
            await here.ping()
        own.start()
        # Connections pooled before the restart look alive until used: none may fail a call now.
        await wait_until_async(lambda: here.feed_live, 30, "the change feed is not live")
        await here.ping()
        assert [info.name for info in await here.list("m")] == ["pirate"]
        await here.close()
    finally:
        own.stop()
