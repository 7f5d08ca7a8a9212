"""The embedded persona store: one SQLite file, safe across restarts, no server to run.

Every version of a persona is a row of ``persona_versions`` (the last ``keep_versions`` are kept);
``personas`` points at the current version. A write is one transaction, so a crash leaves either the
old or the new version, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from persona_store import codec
from persona_store.base import ABSENT
from persona_store.errors import (
    MappingNotFound,
    PersonaNotFound,
    PersonaVersionNotFound,
    StoreUnavailable,
    VersionConflict,
)
from persona_store.mappings import MappingDraft, MappingInfo, MappingRecord, mapping_info, new_mapping_id
from persona_store.records import PersonaDraft, PersonaInfo, PersonaRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS persona_versions (
    model TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    hidden_size INTEGER NOT NULL,
    layers TEXT NOT NULL,
    default_strength REAL NOT NULL,
    description TEXT NOT NULL,
    provenance TEXT NOT NULL,
    checksum TEXT NOT NULL,
    vectors BLOB NOT NULL,
    default_positions TEXT NOT NULL DEFAULT 'all',
    PRIMARY KEY (model, name, version)
);
CREATE TABLE IF NOT EXISTS personas (
    model TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (model, name)
);
CREATE TABLE IF NOT EXISTS mappings (
    id TEXT PRIMARY KEY,
    source_model TEXT NOT NULL,
    target_model TEXT NOT NULL,
    layer_map TEXT NOT NULL,
    source_hidden_size INTEGER NOT NULL,
    target_hidden_size INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    checksum TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mapping_matrices (
    mapping_id TEXT NOT NULL REFERENCES mappings(id) ON DELETE CASCADE,
    source_layer INTEGER NOT NULL,
    matrix BLOB NOT NULL,
    PRIMARY KEY (mapping_id, source_layer)
);
"""
_PERSONA_COLUMNS = ", ".join(f"v.{field}" for field in codec.PERSONA_FIELDS)
_MAPPING_COLUMNS = ", ".join(codec.MAPPING_FIELDS)


def _insert(table: str, fields: dict[str, Any]) -> str:
    """An INSERT of named parameters: ``fields`` itself is the parameter mapping."""
    return f"INSERT INTO {table} ({', '.join(fields)}) VALUES ({', '.join(':' + f for f in fields)})"


def _info(row: tuple[Any, ...]) -> PersonaInfo:
    return codec.decode_persona_info(dict(zip(codec.PERSONA_FIELDS, row, strict=True)))


def _record(row: tuple[Any, ...]) -> PersonaRecord:  # a row of _PERSONA_COLUMNS, then the vectors
    return codec.decode_persona_record(dict(zip((*codec.PERSONA_FIELDS, "vectors"), row, strict=True)))


def _mapping_info(row: tuple[Any, ...]) -> MappingInfo:
    return codec.decode_mapping_info(dict(zip(codec.MAPPING_FIELDS, row, strict=True)))


class SQLiteStore:
    def __init__(self, path: str | Path, keep_versions: int = 10) -> None:
        self.path = Path(path)
        self.keep_versions = keep_versions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(persona_versions)")}
        if "default_positions" not in columns:  # a store written before personas had default positions
            self._conn.execute(
                "ALTER TABLE persona_versions ADD COLUMN default_positions TEXT NOT NULL DEFAULT 'all'"
            )

    async def _run(self, work: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                if self._closed:  # a call that outlives close(), e.g. a request during shutdown
                    raise StoreUnavailable(f"the SQLite store at {self.path} is closed")
                try:
                    return work(*args)
                except sqlite3.OperationalError as exc:
                    raise StoreUnavailable(f"the SQLite store at {self.path} failed: {exc}") from exc

        return await asyncio.to_thread(locked)

    def _current_version(self, model: str, name: str) -> int | None:
        row = self._conn.execute(
            "SELECT version FROM personas WHERE model = ? AND name = ?", (model, name)
        ).fetchone()
        return None if row is None else int(row[0])

    def _get(self, model: str, name: str) -> PersonaRecord:
        row = self._conn.execute(
            f"SELECT {_PERSONA_COLUMNS}, v.vectors FROM personas p JOIN persona_versions v "
            "ON v.model = p.model AND v.name = p.name AND v.version = p.version "
            "WHERE p.model = ? AND p.name = ?",
            (model, name),
        ).fetchone()
        if row is None:
            raise PersonaNotFound(model, name)
        return _record(row)

    def _get_version(self, model: str, name: str, version: int) -> PersonaRecord:
        row = self._conn.execute(
            f"SELECT {_PERSONA_COLUMNS}, v.vectors FROM persona_versions v "
            "WHERE v.model = ? AND v.name = ? AND v.version = ?",
            (model, name, version),
        ).fetchone()
        if row is None:
            raise PersonaVersionNotFound(model, name, version)
        return _record(row)

    def _versions(self, model: str, name: str) -> list[PersonaInfo]:
        rows = self._conn.execute(
            f"SELECT {_PERSONA_COLUMNS} FROM persona_versions v WHERE v.model = ? AND v.name = ? "
            "ORDER BY v.version DESC",
            (model, name),
        ).fetchall()
        return [_info(row) for row in rows]

    def _list(self, model: str | None) -> list[PersonaInfo]:
        query = (
            f"SELECT {_PERSONA_COLUMNS} FROM personas p JOIN persona_versions v "
            "ON v.model = p.model AND v.name = p.name AND v.version = p.version"
        )
        params: tuple[Any, ...] = ()
        if model is not None:
            query += " WHERE p.model = ?"
            params = (model,)
        rows = self._conn.execute(query + " ORDER BY p.model, p.name", params).fetchall()
        return [_info(row) for row in rows]

    def _check(self, model: str, name: str, expected: int | None) -> int | None:
        current = self._current_version(model, name)
        if expected is not None and (current or ABSENT) != expected:
            raise VersionConflict(model, name, expected, current)
        return current

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic write: committed whole, or rolled back whole on any error (a conflict included).

        IMMEDIATE takes the write lock at once, so a version check and the write after it see one state.
        """
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _put(self, draft: PersonaDraft, expected: int | None) -> PersonaInfo:
        with self._transaction():
            self._check(draft.model, draft.name, expected)
            (latest,) = self._conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM persona_versions WHERE model = ? AND name = ?",
                (draft.model, draft.name),
            ).fetchone()
            fields = {**codec.persona_fields(draft, time.time()), "version": int(latest) + 1}
            self._conn.execute(_insert("persona_versions", fields), fields)
            info = codec.decode_persona_info(fields)
            self._conn.execute(
                "INSERT OR REPLACE INTO personas VALUES (?, ?, ?)", (info.model, info.name, info.version)
            )
            self._conn.execute(
                "DELETE FROM persona_versions WHERE model = ? AND name = ? AND version <= ?",
                (info.model, info.name, info.version - self.keep_versions),
            )
        return info

    def _delete(self, model: str, name: str, expected: int | None) -> None:
        with self._transaction():
            if self._check(model, name, expected) is None:
                raise PersonaNotFound(model, name)
            self._conn.execute("DELETE FROM personas WHERE model = ? AND name = ?", (model, name))

    def _put_mapping(self, draft: MappingDraft) -> MappingInfo:
        info = mapping_info(new_mapping_id(), draft, time.time())
        fields = codec.mapping_fields(info)
        with self._transaction():
            self._conn.execute(_insert("mappings", fields), fields)
            self._conn.executemany(
                "INSERT INTO mapping_matrices VALUES (?, ?, ?)",
                [(info.id, layer, codec.matrix_blob(matrix)) for layer, matrix in draft.matrices.items()],
            )
        return info

    def _mapping_info(self, mapping_id: str) -> MappingInfo:
        row = self._conn.execute(
            f"SELECT {_MAPPING_COLUMNS} FROM mappings WHERE id = ?", (mapping_id,)
        ).fetchone()
        if row is None:
            raise MappingNotFound(mapping_id)
        return _mapping_info(row)

    def _get_mapping(self, mapping_id: str) -> MappingRecord:
        info = self._mapping_info(mapping_id)
        rows = self._conn.execute(
            "SELECT source_layer, matrix FROM mapping_matrices WHERE mapping_id = ?", (mapping_id,)
        ).fetchall()
        return MappingRecord(info=info, matrices=codec.decode_matrices(info, rows))

    def _list_mappings(self) -> list[MappingInfo]:
        rows = self._conn.execute(f"SELECT {_MAPPING_COLUMNS} FROM mappings ORDER BY created_at, id")
        return [_mapping_info(row) for row in rows.fetchall()]

    def _delete_mapping(self, mapping_id: str) -> None:
        if self._conn.execute("DELETE FROM mappings WHERE id = ?", (mapping_id,)).rowcount == 0:
            raise MappingNotFound(mapping_id)

    async def get(self, model: str, name: str) -> PersonaRecord:
        return await self._run(self._get, model, name)

    async def get_version(self, model: str, name: str, version: int) -> PersonaRecord:
        return await self._run(self._get_version, model, name, version)

    async def versions(self, model: str, name: str) -> list[PersonaInfo]:
        return await self._run(self._versions, model, name)

    async def put_mapping(self, draft: MappingDraft) -> MappingInfo:
        return await self._run(self._put_mapping, draft)

    async def get_mapping(self, mapping_id: str) -> MappingRecord:
        return await self._run(self._get_mapping, mapping_id)

    async def list_mappings(self) -> list[MappingInfo]:
        return await self._run(self._list_mappings)

    async def delete_mapping(self, mapping_id: str) -> None:
        await self._run(self._delete_mapping, mapping_id)

    async def current_version(self, model: str, name: str) -> int | None:
        return await self._run(self._current_version, model, name)

    async def list(self, model: str | None = None) -> list[PersonaInfo]:
        return await self._run(self._list, model)

    async def put(self, draft: PersonaDraft, expected_version: int | None = None) -> PersonaInfo:
        return await self._run(self._put, draft, expected_version)

    async def delete(self, model: str, name: str, expected_version: int | None = None) -> None:
        await self._run(self._delete, model, name, expected_version)

    async def ping(self) -> None:
        await self._run(lambda: self._conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                self._closed = True
                self._conn.close()  # closing twice is harmless

        await asyncio.to_thread(close)
