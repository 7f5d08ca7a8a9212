"""Errors of the persona store, independent of any server."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of persona store errors."""


class PersonaNotFound(StoreError):
    def __init__(self, model: str, name: str) -> None:
        super().__init__(f"persona '{name}' does not exist for model '{model}'")
        self.model, self.name = model, name
        # The request field that named the persona, set by a server that knows it (its 404's param).
        self.param: str | None = None


class VersionConflict(StoreError):
    def __init__(self, model: str, name: str, expected: int, actual: int | None) -> None:
        current = "none" if actual is None else str(actual)
        wanted = "none" if expected == 0 else str(expected)  # 0 is base.ABSENT: no current version
        super().__init__(
            f"persona '{name}' for model '{model}' is at version {current}, the write expected {wanted}"
        )
        self.expected, self.actual = expected, actual


class StoreUnavailable(StoreError):
    """The store cannot be reached; nothing was read or written."""


class PersonaVersionNotFound(PersonaNotFound):
    def __init__(self, model: str, name: str, version: int) -> None:
        super().__init__(model, name)
        self.args = (f"version {version} of persona '{name}' for model '{model}' is not kept",)
        self.version = version


class MappingNotFound(StoreError):
    def __init__(self, mapping_id: str) -> None:
        super().__init__(f"mapping '{mapping_id}' does not exist")
        self.mapping_id = mapping_id
