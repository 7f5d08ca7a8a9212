"""The shared persona store: Redis, for several server replicas.

Layout (every key under one prefix ``{p}``; model ids are percent-encoded so any id is a safe key
part). These are all the keys the store writes:
- ``{p}:ver:{model}:{name}:{version}``: a hash with one version's fields and vector bytes
  (``persona_store.codec``: ``PERSONA_FIELDS`` and ``vectors``);
- ``{p}:cur:{model}:{name}``: the current version number (absent once deleted);
- ``{p}:seq:{model}:{name}``: the last version number ever given, so versions never repeat;
- ``{p}:hist:{model}:{name}``: a sorted set of the kept versions;
- ``{p}:idx:{model}``: a set of the names of the model's current personas;
- ``{p}:models``: a set of every model a persona was ever written for (``list()`` of all models);
- ``{p}:map:{id}``: a hash with one mapping's fields (``codec.MAPPING_FIELDS``) and a field
  ``m:{block}`` per matrix;
- ``{p}:maps``: a sorted set of mapping ids by creation time.

Persona writes and deletes are Lua scripts: the version check, the new version and the index change
happen in one atomic step on the server, so no reader ever sees half a write. The same script
publishes the change on the pub/sub channel ``{p}:changes`` (a channel, not a key), which replicas
use to drop their cached copy at once. Reads of many keys (``list``, ``versions``, ``list_mappings``)
are pipelined: a fixed few round trips, however many personas there are.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from persona_store import codec
from persona_store.errors import (
    MappingNotFound,
    PersonaNotFound,
    PersonaVersionNotFound,
    StoreUnavailable,
    VersionConflict,
)
from persona_store.mappings import MappingDraft, MappingInfo, MappingRecord, mapping_info, new_mapping_id
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord

KEY_PREFIX = "persona-server"
T = TypeVar("T")
_MATRIX_FIELD = "m:"  # a mapping's hash holds the matrix of source block N in field "m:N"

# KEYS: cur, seq, hist, idx, changes channel; ARGV: expected version ('' for none, '0' for absent),
# keep, version key prefix, name, change message, then field/value pairs. Returns the new version, or
# {err} on a version conflict.
_PUT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and (current or '0') ~= ARGV[1] then
  return redis.error_reply('CONFLICT ' .. (current or 'none'))
end
local version = redis.call('INCR', KEYS[2])
local key = ARGV[3] .. version
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', key, 'version', version, unpack(fields))
redis.call('SET', KEYS[1], version)
redis.call('ZADD', KEYS[3], version, version)
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('PUBLISH', KEYS[5], ARGV[5])
local keep = tonumber(ARGV[2])
local old = redis.call('ZRANGE', KEYS[3], 0, -keep - 1)
for _, v in ipairs(old) do
  redis.call('DEL', ARGV[3] .. v)
  redis.call('ZREM', KEYS[3], v)
end
return version
"""
# KEYS: cur, idx, changes channel; ARGV: expected version ('' for none), name, change message.
_DELETE = """
local current = redis.call('GET', KEYS[1])
if not current then return redis.error_reply('MISSING') end
if ARGV[1] ~= '' and current ~= ARGV[1] then return redis.error_reply('CONFLICT ' .. current) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return current
"""
# KEYS: cur; ARGV: version key prefix. Returns the current version's hash as a flat list, or nil.
_GET = """
local current = redis.call('GET', KEYS[1])
if not current then return nil end
return redis.call('HGETALL', ARGV[1] .. current)
"""


def change_message(model: str, name: str) -> str:
    return json.dumps({"model": model, "name": name})


# Reads that fail on a dead connection are sent once more, after a short pause, on a fresh one.
_RETRY_BACKOFF = ExponentialBackoff(cap=0.5, base=0.05)
_SOCKET_TIMEOUT = 2.0
# A connection idle this long is PINGed before its next command. The change feed's connection is
# idle while nobody writes: the PING finds a dead one (answered by a reset) and the feed breaks and
# resubscribes, instead of waiting for messages that will never come.
HEALTH_CHECK_SECONDS = 10


class RedisStore:
    def __init__(
        self,
        client: aioredis.Redis,
        keep_versions: int = 10,
        prefix: str = KEY_PREFIX,
        once: aioredis.Redis | None = None,
    ) -> None:
        """``client`` reads; ``once`` (default: ``client``) sends what must not be retried: writes, and
        the change feed, whose break the cache must see (a silent resubscription loses messages)."""
        self._redis = client
        self._once = once or client
        self._keep = keep_versions
        self._prefix = prefix
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._get = client.register_script(_GET)

    @classmethod
    def from_url(cls, url: str, keep_versions: int = 10) -> RedisStore:
        """Reads retry once on a fresh connection; writes, never retried, get a fresh one to begin with.

        After Redis comes back (a restart, a new container), pooled connections can be dead yet look
        alive: a command on one fails with a reset, or with nothing until the socket timeout. A read
        is safe to send again. A write whose reply was lost may have been applied, so a second send
        could write twice: writes instead never reuse an idle pooled connection (they are rare).
        The change feed is not retried either: the cache must see its break.
        """
        timeouts: dict[str, Any] = {
            "socket_timeout": _SOCKET_TIMEOUT,
            "socket_connect_timeout": _SOCKET_TIMEOUT,
        }
        reader = aioredis.Redis.from_url(
            url,
            retry=Retry(_RETRY_BACKOFF, retries=1),  # on redis-py's ConnectionError and TimeoutError
            health_check_interval=HEALTH_CHECK_SECONDS,
            **timeouts,
        )
        once = aioredis.Redis.from_url(
            url, retry=Retry(NoBackoff(), retries=0), health_check_interval=HEALTH_CHECK_SECONDS, **timeouts
        )
        return cls(reader, keep_versions, once=once)

    def _key(self, kind: str, model: str, name: str | None = None) -> str:
        parts = [self._prefix, kind, quote(model, safe="")]
        if name is not None:
            parts.append(name)
        return ":".join(parts)

    @property
    def _models_key(self) -> str:
        return f"{self._prefix}:models"

    @property
    def _mappings_key(self) -> str:
        return f"{self._prefix}:maps"

    def _mapping_key(self, mapping_id: str) -> str:
        return f"{self._prefix}:map:{mapping_id}"

    async def _call(self, coroutine: Awaitable[T]) -> T:
        try:
            return await coroutine
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"the Redis persona store is unreachable: {exc}") from exc

    async def _write(self, send: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """A write, sent once, on a connection opened for it: idle ones may be dead (see ``from_url``)."""
        await self._once.connection_pool.disconnect(inuse_connections=False)  # the feed's is in use
        return await self._call(send(self._once))

    async def get(self, model: str, name: str) -> PersonaRecord:
        flat = await self._call(self._get(keys=[self._key("cur", model, name)],
                                          args=[self._key("ver", model, name) + ":"]))  # fmt: skip
        if not flat:
            raise PersonaNotFound(model, name)
        return codec.decode_persona_record({codec.text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)})

    async def get_version(self, model: str, name: str, version: int) -> PersonaRecord:
        fields = await self._call(self._redis.hgetall(f"{self._key('ver', model, name)}:{version}"))
        if not fields:
            raise PersonaVersionNotFound(model, name, version)
        return codec.decode_persona_record({codec.text(k): v for k, v in fields.items()})

    async def versions(self, model: str, name: str) -> list[PersonaInfo]:
        kept = await self._call(self._redis.zrevrange(self._key("hist", model, name), 0, -1))
        keys = [f"{self._key('ver', model, name)}:{codec.text(version)}" for version in kept]
        # A version trimmed between the two reads is left out.
        return [codec.decode_persona_info(f) for f in await self._existing_hashes(keys, codec.PERSONA_FIELDS)]

    async def current_version(self, model: str, name: str) -> int | None:
        version = await self._call(self._redis.get(self._key("cur", model, name)))
        return None if version is None else int(version)

    async def list(self, model: str | None = None) -> list[PersonaInfo]:
        """At most four round trips however many personas: models, their names, versions, fields."""
        if model is None:
            models = [codec.text(m) for m in await self._call(self._redis.smembers(self._models_key))]
        else:
            models = [model]
        indexes = await self._per_key("SMEMBERS", [self._key("idx", target) for target in models])
        personas = [
            (target, codec.text(name))
            for target, names in zip(models, indexes, strict=True)
            for name in names
        ]
        if not personas:
            return []
        current_keys = [self._key("cur", m, n) for m, n in personas]
        current = await self._call(self._redis.mget(current_keys))
        keys = [  # a persona deleted between the reads has no current version: left out
            f"{self._key('ver', m, n)}:{codec.text(version)}"
            for (m, n), version in zip(personas, current, strict=True)
            if version is not None
        ]
        infos = [
            codec.decode_persona_info(f) for f in await self._existing_hashes(keys, codec.PERSONA_FIELDS)
        ]
        return sorted(infos, key=lambda info: (info.model, info.name))

    async def _existing_hashes(self, keys: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """The named fields of each hash, in one round trip, leaving out hashes that no longer exist."""
        rows = await self._per_key("HMGET", keys, *fields)
        # The first field is set in every hash the store writes: without it, the hash is gone.
        return [dict(zip(fields, values, strict=True)) for values in rows if values[0] is not None]

    async def _per_key(self, command: str, keys: Sequence[str], *args: Any) -> list[Any]:
        """``command key *args`` for each key, pipelined: one round trip however many keys."""
        if not keys:
            return []

        async def send() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.execute_command(command, key, *args)
                return await pipe.execute()

        return await self._call(send())

    async def put(self, draft: PersonaDraft, expected_version: int | None = None) -> PersonaInfo:
        fields = codec.persona_fields(draft, time.time())  # the script adds the version it assigns
        keys = [
            self._key("cur", draft.model, draft.name),
            self._key("seq", draft.model, draft.name),
            self._key("hist", draft.model, draft.name),
            self._key("idx", draft.model),
            self.changes_channel,
        ]
        args: list[Any] = [
            "" if expected_version is None else str(expected_version),
            self._keep,
            self._key("ver", draft.model, draft.name) + ":",
            draft.name,
            change_message(draft.model, draft.name),
        ]
        for field, value in fields.items():
            args += [field, value]

        async def send(writer: aioredis.Redis) -> Any:
            version = await self._put(keys=keys, args=args, client=writer)
            await writer.sadd(self._models_key, draft.model)
            return version

        try:
            version = await self._write(send)
        except ResponseError as exc:
            raise self._conflict(draft.model, draft.name, expected_version, exc) from exc
        return codec.decode_persona_info({**fields, "version": version})

    @staticmethod
    def _conflict(model: str, name: str, expected: int | None, exc: ResponseError) -> Exception:
        message = str(exc)
        if message.startswith("CONFLICT") and expected is not None:
            actual = message.split()[-1]
            return VersionConflict(model, name, expected, None if actual == "none" else int(actual))
        if message.startswith("MISSING"):
            return PersonaNotFound(model, name)
        return exc

    async def delete(self, model: str, name: str, expected_version: int | None = None) -> None:
        keys = [self._key("cur", model, name), self._key("idx", model), self.changes_channel]
        expected = "" if expected_version is None else str(expected_version)
        try:
            await self._write(
                lambda writer: self._delete(
                    keys=keys, args=[expected, name, change_message(model, name)], client=writer
                )
            )
        except ResponseError as exc:
            raise self._conflict(model, name, expected_version, exc) from exc

    async def put_mapping(self, draft: MappingDraft) -> MappingInfo:
        info = mapping_info(new_mapping_id(), draft, time.time())
        fields: dict[str, Any] = codec.mapping_fields(info)
        fields.update(
            {f"{_MATRIX_FIELD}{layer}": codec.matrix_blob(matrix) for layer, matrix in draft.matrices.items()}
        )

        async def send(writer: aioredis.Redis) -> None:
            async with writer.pipeline(transaction=True) as pipe:  # MULTI/EXEC: all of it or nothing
                pipe.hset(self._mapping_key(info.id), mapping=fields)
                pipe.zadd(self._mappings_key, {info.id: info.created_at})
                await pipe.execute()

        await self._write(send)
        return info

    async def get_mapping(self, mapping_id: str) -> MappingRecord:
        stored = await self._call(self._redis.hgetall(self._mapping_key(mapping_id)))
        if not stored:
            raise MappingNotFound(mapping_id)
        fields = {codec.text(k): v for k, v in stored.items()}
        info = codec.decode_mapping_info(fields)
        blobs = [
            (int(field.removeprefix(_MATRIX_FIELD)), blob)
            for field, blob in fields.items()
            if field.startswith(_MATRIX_FIELD)
        ]
        return MappingRecord(info=info, matrices=codec.decode_matrices(info, blobs))

    async def list_mappings(self) -> list[MappingInfo]:
        """Two round trips however many mappings: the ids, then their fields (never the matrices)."""
        ids = await self._call(self._redis.zrange(self._mappings_key, 0, -1))
        keys = [self._mapping_key(codec.text(mapping_id)) for mapping_id in ids]
        # A mapping deleted between the two reads is left out.
        return [codec.decode_mapping_info(f) for f in await self._existing_hashes(keys, codec.MAPPING_FIELDS)]

    async def delete_mapping(self, mapping_id: str) -> None:

        async def send(writer: aioredis.Redis) -> list[Any]:
            async with writer.pipeline(transaction=True) as pipe:
                pipe.zrem(self._mappings_key, mapping_id)
                pipe.delete(self._mapping_key(mapping_id))
                return await pipe.execute()

        removed, _ = await self._write(send)
        if not removed:
            raise MappingNotFound(mapping_id)

    @property
    def changes_channel(self) -> str:
        return f"{self._prefix}:changes"

    async def changes(self, on_live: Callable[[], None]) -> AsyncIterator[tuple[str, str]]:
        """(model, name) of every persona written or deleted from now on, by any replica.

        Pub/sub is best-effort: a message sent while this subscription was down is lost, so readers
        keep a version check as well. Raises StoreUnavailable when the connection breaks.
        """
        pubsub = self._once.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(pubsub.subscribe(self.changes_channel))
            on_live()
            while True:
                # A bounded wait: an unbounded one would trip the client's socket timeout when quiet.
                message = await self._call(pubsub.get_message(timeout=1.0))
                if message is None or message["type"] != "message":
                    continue
                change = json.loads(message["data"])
                yield change["model"], change["name"]
        finally:
            await pubsub.aclose()

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
        if self._once is not self._redis:
            await self._once.aclose()
