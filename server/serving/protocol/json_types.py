"""Scalar types of the request bodies that accept what their JSON Schema type says, and only that.

Pydantic's lax mode converts more than /openapi.json admits: ``true`` and ``"7"`` become the integer
1 and 7, ``"1.5"`` a number, ``1`` and ``"yes"`` a boolean, so a bake with ``"seed": false`` ran with
seed 0. These types refuse such values (422 naming the field), and accept everything the schema
allows, ``2.0`` for an integer included (JSON Schema counts it as one). ``Text`` is a string that is
valid Unicode (JSON can escape a lone surrogate, which no tokenizer or store takes).

Bounds sit inside a bounded alias (``Field`` before the validators): applied outside it, pydantic
writes them into the JSON Schema as ``ge``/``le`` instead of ``minimum``/``maximum``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BeforeValidator,
    Field,
    Strict,
    StrictBool,
    StringConstraints,
)

from persona_store.records import PERSONA_NAME_PATTERN


def _json_integer(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # anything else but an int is refused by the strict int after this


Int = Annotated[int, Strict(), BeforeValidator(_json_integer)]
Float = Annotated[float, Strict(), AllowInfNan(False)]  # an integer is a number too
Bool = StrictBool

# The integers every JSON reader carries exactly (RFC 8259, section 6): a seed past them reads as
# another seed in a client that parses numbers as doubles, and a fuzzer's bound check goes wrong too.
JSON_SAFE_INTEGER = 2**53 - 1

LayerIndex = Annotated[int, Field(ge=0, le=100_000), Strict(), BeforeValidator(_json_integer)]
Seed = Annotated[
    int, Field(ge=-JSON_SAFE_INTEGER, le=JSON_SAFE_INTEGER), Strict(), BeforeValidator(_json_integer)
]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1), Strict(), BeforeValidator(_json_integer)]

# A layer index as a JSON object key (a string): its decimal digits, 0 to 100000, and nothing else
# (no sign, space or underscore, which int() would take). The field states it as propertyNames.
LAYER_KEY_PATTERN = r"^(100000|[0-9]{1,5})$"
LAYER_KEYS = {"propertyNames": {"pattern": LAYER_KEY_PATTERN}}


def _layer_key(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(LAYER_KEY_PATTERN, value):
        return int(value)
    return value


LayerKey = Annotated[int, Field(ge=0, le=100_000), Strict(), BeforeValidator(_layer_key)]


def _valid_unicode(value: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"); no tokenizer, database or encoder accepts one.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("the text holds a lone surrogate, which is not valid Unicode") from exc
    return value


# Refuses text that is not valid Unicode; in an Annotated string it follows the bounds, if any.
VALID_UNICODE = AfterValidator(_valid_unicode)
Text = Annotated[str, VALID_UNICODE]
PersonaName = Annotated[str, StringConstraints(pattern=PERSONA_NAME_PATTERN)]
