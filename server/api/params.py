"""The `param` of a validation error: the request field at fault, as a client names it.

Pydantic's error locations carry its own bookkeeping: where the value came from (body, query,
header), the member of a union it tried (``function-after[_valid_unicode(), str]``,
``list[PersonaTermIn]``), ``[key]`` for a bad mapping key. A client knows none of these: the param
is the field's path in the request, dotted (``messages.0.content``, ``persona.1.name``), or a
parameter's name (``model``, ``if-match``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_SOURCES = frozenset({"body", "query", "header", "path", "cookie"})
# A union member's label: a type's name or repr; our fields are snake_case, never like these.
_UNION_MEMBER = re.compile(r"[\[\]()-]|^(str|int|float|bool|none|dict|list)$")


def _is_union_member(part: int | str) -> bool:
    return isinstance(part, str) and _UNION_MEMBER.search(part) is not None


def _wrong_member(error: dict[str, Any], errors: list[dict[str, Any]]) -> bool:
    """Whether ``error`` only says the value is not of one union member's type while another member
    took the value and says more (``persona: [{"name": 7}]`` is no string, and its item's name is no
    string; ``prompt: ""`` is no list, and is too short)."""
    location = tuple(error.get("loc", ()))
    if not location or not _is_union_member(location[-1]) or not _type_error(error):
        return False
    stem = location[:-1]
    return any(
        other is not error
        and tuple(other.get("loc", ()))[: len(stem)] == stem
        and (len(other.get("loc", ())) > len(location) or not _type_error(other))
        for other in errors
    )


def _type_error(error: dict[str, Any]) -> bool:
    return str(error.get("type", "")).endswith("_type")


def telling_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors that say what is wrong: without a union member's "not my type" when another
    member's error says more."""
    kept = [error for error in errors if not _wrong_member(error, errors)]
    return kept or errors


def field_path(location: Sequence[int | str]) -> str | None:
    """The dotted request path of a pydantic error location, or None when it names no field."""
    parts = list(location)
    if parts and parts[0] in _SOURCES:
        parts = parts[1:]
    kept: list[str] = []
    for part in parts:
        if part == "[key]":  # a bad key of a mapping: the mapping is the field at fault
            if kept:
                kept.pop()
        elif not _is_union_member(part):
            kept.append(str(part))
    return ".".join(kept) or None
