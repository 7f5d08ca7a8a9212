"""The shared persona store: Redis, for several server replicas.

Layout (every key under one prefix; model ids are percent-encoded so any id is a safe key part):
- ``{p}:ver:{model}:{name}:{version}``: a hash with one version's metadata and vector bytes;
- ``{p}:cur:{model}:{name}``: the current version number (absent once deleted);
- ``{p}:seq:{model}:{name}``: the last version number ever given, so versions never repeat;
- ``{p}:hist:{model}:{name}``: a sorted set of the kept versions;
- ``{p}:idx:{model}``: the names of the model's current personas;
- ``{p}:map:{id}``: a hash with one mapping's metadata and a field ``m:{block}`` per matrix;
- ``{p}:maps``: a sorted set of mapping ids by creation time.
Writes and deletes are Lua scripts: the version check, the new version and the index change happen
in one atomic step on the server, so no reader ever sees half a write. The same script publishes the
change on ``{p}:changes`` (pub/sub), which replicas use to drop their cached copy at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from persona_store.errors import (
    MappingNotFound,
    PersonaNotFound,
    PersonaVersionNotFound,
    StoreUnavailable,
    VersionConflict,
)
from persona_store.mappings import MappingDraft, MappingInfo, MappingRecord, mapping_info, new_mapping_id
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord, vectors_checksum

KEY_PREFIX = "persona-server"
_INFO_FIELDS = (
    "model", "name", "version", "created_at", "hidden_size", "layers", "default_strength",
    "default_positions", "description", "provenance", "checksum",
)  # fmt: skip

# KEYS: cur, seq, hist, idx, changes channel; ARGV: expected version ('' for none), keep, version key
# prefix, name, change message, then field/value pairs. Returns the new version, or {err} on a
# version conflict.
_PUT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and current ~= ARGV[1] then
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(fields: dict[str, Any]) -> PersonaInfo:
    return PersonaInfo(
        model=_text(fields["model"]),
        name=_text(fields["name"]),
        layers=tuple(json.loads(fields["layers"])),
        hidden_size=int(fields["hidden_size"]),
        default_strength=float(fields["default_strength"]),
        description=_text(fields["description"]),
        provenance=json.loads(fields["provenance"]),
        version=int(fields["version"]),
        created_at=float(fields["created_at"]),
        checksum=_text(fields["checksum"]),
        default_positions=_text(fields["default_positions"]),
    )


_MAPPING_FIELDS = (
    "id", "source_model", "target_model", "layer_map", "source_hidden_size", "target_hidden_size",
    "metadata", "created_at", "checksum",
)  # fmt: skip


def _record(fields: dict[str, Any]) -> PersonaRecord:
    info = _info(fields)
    matrix = np.frombuffer(fields["vectors"], dtype=np.float32).reshape(len(info.layers), info.hidden_size)
    return PersonaRecord(info=info, vectors={layer: matrix[i].copy() for i, layer in enumerate(info.layers)})


def _mapping_info(fields: dict[str, Any]) -> MappingInfo:
    return MappingInfo(
        id=_text(fields["id"]),
        source_model=_text(fields["source_model"]),
        target_model=_text(fields["target_model"]),
        layer_map={int(k): int(v) for k, v in json.loads(fields["layer_map"]).items()},
        source_hidden_size=int(fields["source_hidden_size"]),
        target_hidden_size=int(fields["target_hidden_size"]),
        metadata=json.loads(fields["metadata"]),
        created_at=float(fields["created_at"]),
        checksum=_text(fields["checksum"]),
    )


def change_message(model: str, name: str) -> str:
    return json.dumps({"model": model, "name": name})


class RedisStore:
    def __init__(self, client: aioredis.Redis, keep_versions: int = 10, prefix: str = KEY_PREFIX) -> None:
        self._redis = client
        self._keep = keep_versions
        self._prefix = prefix
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._get = client.register_script(_GET)

    @classmethod
    def from_url(cls, url: str, keep_versions: int = 10) -> RedisStore:
        client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, keep_versions)

    def _key(self, kind: str, model: str, name: str | None = None) -> str:
        parts = [self._prefix, kind, quote(model, safe="")]
        if name is not None:
            parts.append(name)
        return ":".join(parts)

    async def _call(self, coroutine: Any) -> Any:
        try:
            return await coroutine
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"the Redis persona store is unreachable: {exc}") from exc

    async def get(self, model: str, name: str) -> PersonaRecord:
        flat = await self._call(self._get(keys=[self._key("cur", model, name)],
                                          args=[self._key("ver", model, name) + ":"]))  # fmt: skip
        if not flat:
            raise PersonaNotFound(model, name)
        return _record({_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)})

    async def get_version(self, model: str, name: str, version: int) -> PersonaRecord:
        fields = await self._call(self._redis.hgetall(f"{self._key('ver', model, name)}:{version}"))
        if not fields:
            raise PersonaVersionNotFound(model, name, version)
        return _record({_text(k): v for k, v in fields.items()})

    async def versions(self, model: str, name: str) -> list[PersonaInfo]:
        kept = await self._call(self._redis.zrevrange(self._key("hist", model, name), 0, -1))
        infos = []
        for version in kept:
            key = f"{self._key('ver', model, name)}:{_text(version)}"
            values = await self._call(self._redis.hmget(key, list(_INFO_FIELDS)))
            if values[0] is not None:  # trimmed between the two reads
                infos.append(_info(dict(zip(_INFO_FIELDS, values, strict=True))))
        return infos

    async def current_version(self, model: str, name: str) -> int | None:
        version = await self._call(self._redis.get(self._key("cur", model, name)))
        return None if version is None else int(version)

    async def list(self, model: str | None = None) -> list[PersonaInfo]:
        if model is None:
            models = [_text(m) for m in await self._call(self._redis.smembers(f"{self._prefix}:models"))]
        else:
            models = [model]
        infos = []
        for target in models:
            names = sorted(_text(n) for n in await self._call(self._redis.smembers(self._key("idx", target))))
            for name in names:
                version = await self._call(self._redis.get(self._key("cur", target, name)))
                if version is None:
                    continue  # deleted between the two reads
                values = await self._call(
                    self._redis.hmget(
                        f"{self._key('ver', target, name)}:{_text(version)}", list(_INFO_FIELDS)
                    )
                )
                if values[0] is not None:
                    infos.append(_info(dict(zip(_INFO_FIELDS, values, strict=True))))
        return sorted(infos, key=lambda info: (info.model, info.name))

    async def put(self, draft: PersonaDraft, expected_version: int | None = None) -> PersonaInfo:
        created_at = time.time()
        checksum = vectors_checksum(draft.vectors)
        fields: dict[str, Any] = {
            "model": draft.model,
            "name": draft.name,
            "created_at": repr(created_at),
            "hidden_size": draft.hidden_size,
            "layers": json.dumps(list(draft.vectors)),
            "default_strength": repr(float(draft.default_strength)),
            "default_positions": draft.default_positions,
            "description": draft.description,
            "provenance": json.dumps(draft.provenance),
            "checksum": checksum,
            "vectors": np.stack(list(draft.vectors.values())).astype(np.float32).tobytes(),
        }
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
        try:
            version = await self._call(self._put(keys=keys, args=args))
        except ResponseError as exc:
            raise self._conflict(draft.model, draft.name, expected_version, exc) from exc
        await self._call(self._redis.sadd(f"{self._prefix}:models", draft.model))
        return _info({**fields, "version": version})

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
            await self._call(self._delete(keys=keys, args=[expected, name, change_message(model, name)]))
        except ResponseError as exc:
            raise self._conflict(model, name, expected_version, exc) from exc

    async def put_mapping(self, draft: MappingDraft) -> MappingInfo:
        info = mapping_info(new_mapping_id(), draft, time.time())
        fields: dict[str, Any] = {
            "id": info.id,
            "source_model": info.source_model,
            "target_model": info.target_model,
            "layer_map": json.dumps(info.layer_map),
            "source_hidden_size": info.source_hidden_size,
            "target_hidden_size": info.target_hidden_size,
            "metadata": json.dumps(info.metadata),
            "created_at": repr(info.created_at),
            "checksum": info.checksum,
        }
        fields.update({f"m:{layer}": matrix.tobytes() for layer, matrix in draft.matrices.items()})
        async with self._redis.pipeline(transaction=True) as pipe:  # MULTI/EXEC: all of it or nothing
            pipe.hset(f"{self._prefix}:map:{info.id}", mapping=fields)
            pipe.zadd(f"{self._prefix}:maps", {info.id: info.created_at})
            await self._call(pipe.execute())
        return info

    async def get_mapping(self, mapping_id: str) -> MappingRecord:
        fields = await self._call(self._redis.hgetall(f"{self._prefix}:map:{mapping_id}"))
        if not fields:
            raise MappingNotFound(mapping_id)
        fields = {_text(k): v for k, v in fields.items()}
        info = _mapping_info(fields)
        shape = (info.source_hidden_size, info.target_hidden_size)
        matrices = {
            int(key.removeprefix("m:")): np.frombuffer(value, dtype=np.float32).reshape(shape)
            for key, value in fields.items()
            if key.startswith("m:")
        }
        return MappingRecord(info=info, matrices=dict(sorted(matrices.items())))

    async def list_mappings(self) -> list[MappingInfo]:
        ids = await self._call(self._redis.zrange(f"{self._prefix}:maps", 0, -1))
        infos = []
        for mapping_id in ids:
            key = f"{self._prefix}:map:{_text(mapping_id)}"
            values = await self._call(self._redis.hmget(key, list(_MAPPING_FIELDS)))
            if values[0] is not None:  # deleted between the two reads
                infos.append(_mapping_info(dict(zip(_MAPPING_FIELDS, values, strict=True))))
        return infos

    async def delete_mapping(self, mapping_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(f"{self._prefix}:maps", mapping_id)
            pipe.delete(f"{self._prefix}:map:{mapping_id}")
            removed, _ = await self._call(pipe.execute())
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
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
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
