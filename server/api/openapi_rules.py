"""What /openapi.json states beyond the models' own schemas: every bound and rule the server enforces.

The request models give types, static bounds and patterns. Completed here:

- what only the running server knows: the served models' blocks and hidden sizes, the strength,
  ``max_tokens`` and answer limits, which engines constrain decoding or run closed loops;
- rules between fields that JSON Schema can state (``if``/``then``, ``oneOf``), as the serving
  layer enforces them (serving/personas.py, steering_loops.py, completions.py, routes/openai.py);
- repairs of what FastAPI and pydantic write: an optional parameter or form field can be absent but
  never ``null`` on the wire, and a bound on a validated alias comes out as ``ge``/``le``.

With one served model every bound is exact; with several, a bound is the loosest over them (a
layer one model has is stated, though another model refuses it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI

from server.admin.persona_admin import largest_value
from server.api.services import services_of

Schema = dict[str, Any]
_NULL = {"type": "null"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMERIC_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


@dataclass(frozen=True)
class Served:
    """The facts of the running server that bound a request."""

    steerable_layers: list[int]
    blocks: int
    hidden_sizes: tuple[int, int]
    max_strength: float
    max_tokens_cap: int
    default_max_tokens: int
    max_answers: int
    constrained_decoding: bool
    closed_loop: bool
    vocab_size: int | None  # stop_token_ids are below it (None: some engine checks none)


def served_facts(app: FastAPI) -> Served | None:
    """The running server's facts, or None before its models are loaded (no lifespan)."""
    services = services_of(app)
    if services is None or not services.registry.ids:
        return None
    infos = [backend.info for backend in services.registry]
    settings = services.settings
    return Served(
        steerable_layers=sorted({layer for info in infos for layer in info.steerable_layers}),
        blocks=max(info.num_layers for info in infos),
        hidden_sizes=(min(info.hidden_size for info in infos), max(info.hidden_size for info in infos)),
        max_strength=settings.max_strength,
        max_tokens_cap=settings.max_tokens_cap,
        default_max_tokens=settings.default_max_tokens,
        max_answers=services.registry.max_in_flight,
        constrained_decoding=any(info.constrained_decoding for info in infos),
        closed_loop=any(info.closed_loop for info in infos),
        vocab_size=_largest_vocabulary([info.vocab_size for info in infos]),
    )


def _largest_vocabulary(sizes: list[int | None]) -> int | None:
    known = [size for size in sizes if size is not None]
    return max(known) if len(known) == len(sizes) else None


def schema_nodes(node: Any) -> Iterator[Schema]:
    """Every object of a JSON Schema document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from schema_nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from schema_nodes(item)


def fix_numeric_keywords(schema: Schema) -> None:
    """``ge``/``le``/``gt``/``lt`` (pydantic's names, left where a bound wraps a validated alias such
    as ``Int | None``) as JSON Schema's keywords."""
    for node in schema_nodes(schema):
        if node.get("type") in ("integer", "number"):
            for name, keyword in _NUMERIC_KEYWORDS.items():
                if name in node:
                    node[keyword] = node.pop(name)


def _not_null(node: Schema) -> None:
    options = node.get("anyOf")
    if isinstance(options, list) and _NULL in options:
        kept = [option for option in options if option != _NULL]
        del node["anyOf"]
        if len(kept) == 1:
            node.update(kept[0])
        else:
            node["anyOf"] = kept


def drop_wire_nulls(schema: Schema) -> None:
    """An optional query, header or form field is absent or a value: ``null`` is no value it can
    take (a client sending the text "null" is refused), so the schema does not offer it."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if not parameter.get("required"):
                    _not_null(parameter.get("schema", {}))
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        if name.startswith("Body_"):  # FastAPI's models of multipart forms
            for field in component.get("properties", {}).values():
                _not_null(field)


def _options(prop: Schema) -> list[Schema]:
    """The non-null alternatives of a property (the property itself when it has none)."""
    return [option for option in prop.get("anyOf", [prop]) if option != _NULL]


def _bound(prop: Schema | None, low: float | None = None, high: float | None = None) -> None:
    for option in _options(prop or {}):
        if option.get("type") in ("integer", "number"):
            if low is not None:
                option["minimum"] = max(low, option.get("minimum", low))
            if high is not None:
                option["maximum"] = min(high, option.get("maximum", high))


def _strength(prop: Schema | None, served: Served) -> None:
    _bound(prop, -served.max_strength, served.max_strength)


def _layer_keys(layers: list[int]) -> Schema:
    return {"pattern": "^(" + "|".join(str(layer) for layer in layers) + ")$"}


def _layer_items(prop: Schema | None, layers: list[int]) -> None:
    for option in _options(prop or {}):
        if option.get("type") == "array":
            option["items"] = {"type": "integer", "enum": layers}


def _is(value: Any) -> Schema:
    return {"const": value}


def _given(*fields: str, **conditions: Schema) -> Schema:
    """An ``if`` that holds when each of ``conditions`` holds of a present field."""
    return {"properties": conditions, "required": list(fields or conditions)}


def _one_answer(chat: bool) -> Schema:
    """One answer: n is 1 (or absent) and, for a text completion, the prompt is one prompt."""
    then: Schema = {"properties": {"n": _is(1)}}
    if not chat:
        then["properties"]["prompt"] = {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 1}]}
    return then


def _completion_rules(chat: bool) -> list[Schema]:
    """The rules between a completion's fields (each is a refusal of the serving layer)."""
    monitored = {"type": "array", "minItems": 1}
    persona = {"anyOf": [{"type": "string"}, {"type": "array"}]}
    rules = [
        # persona_strength and steering need a persona; persona_strength a single one.
        {"if": _given(persona_strength={"type": "number"}), "then": _given(persona={"type": "string"})},
        {"if": _given(steering={"type": "object"}), "then": _given(persona=persona)},
        {"if": _given(persona_monitor_tokens=_is(True)), "then": _given(persona_monitor=monitored)},
        # A monitor scores one answer; a closed loop follows one. (One rule: schemathesis expands
        # each if/then into two branches, and gives up on a schema of ten, or of seven with
        # "min_tokens <= the default max_tokens when max_tokens is unset", a rule left unstated.)
        {
            "if": {
                "anyOf": [
                    _given(persona_monitor=monitored),
                    _given(persona_monitor_tokens=_is(True)),
                    _given(persona_target={"type": "object"}),
                    _given(persona_when={"type": "array"}),
                ]
            },
            "then": _one_answer(chat),
        },
        {"if": _given("response_format", response_format=_json_schema_format()), "then": _with_schema()},
    ]
    if chat:
        rules.append({"if": _given(top_logprobs={"type": "integer"}), "then": _given(logprobs=_is(True))})
    else:
        rules.append({"if": _given(echo=_is(True)), "then": {"properties": {"logprobs": _NULL}}})
    return rules


def _json_schema_format() -> Schema:
    return {"type": "object", "properties": {"type": _is("json_schema")}, "required": ["type"]}


def _with_schema() -> Schema:
    json_schema = {"properties": {"schema": {"type": "object"}}, "required": ["schema"]}
    inner = {"properties": {"json_schema": json_schema}, "required": ["json_schema"]}
    return {"properties": {"response_format": inner}}


def _one_threshold() -> list[Schema]:
    """A persona_when rule takes exactly one of above or below."""
    return [{"properties": {side: {"type": "number"}}, "required": [side]} for side in ("above", "below")]


def add_static_rules(schemas: dict[str, Schema]) -> None:
    """The rules between fields, which hold whatever the server serves."""
    for name, chat in (("ChatCompletionRequest", True), ("CompletionRequest", False)):
        if name in schemas:
            schemas[name]["allOf"] = _completion_rules(chat)
    if "PersonaRuleIn" in schemas:
        schemas["PersonaRuleIn"]["oneOf"] = _one_threshold()


def _completion_bounds(schema: Schema, served: Served) -> None:
    properties = schema.get("properties", {})
    for field in ("n", "best_of"):
        _bound(properties.get(field), high=served.max_answers)
    for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
        _bound(properties.get(field), high=served.max_tokens_cap)
    _strength(properties.get("persona_strength"), served)
    if served.vocab_size is not None:
        for option in _options(properties.get("stop_token_ids", {})):
            _bound(option.get("items"), high=served.vocab_size - 1)
    if not served.closed_loop:  # no engine reads the model as it writes
        properties["persona_target"] = properties["persona_when"] = _NULL
        properties["persona_monitor_tokens"] = _is(False)


# Strengths a request may name, each within [-max_strength, max_strength].
_STRENGTHS = [
    ("PersonaTermIn", "strength"), ("SteerIn", "strength"), ("PersonaTargetIn", "strength"),
    ("BakeRequest", "strength"), ("PersonaUpload", "default_strength"),
]  # fmt: skip


def add_served_bounds(schemas: dict[str, Schema], served: Served) -> None:
    """The bounds of the running server's models and limits."""
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        if name in schemas:
            _completion_bounds(schemas[name], served)
    for name, field in _STRENGTHS:
        _strength(schemas.get(name, {}).get("properties", {}).get(field), served)
    _bound(
        schemas.get("PersonaTargetIn", {}).get("properties", {}).get("max_strength"), high=served.max_strength
    )
    for name in ("SteeringIn", "ExtractionRequest"):
        _layer_items(schemas.get(name, {}).get("properties", {}).get("layers"), served.steerable_layers)
    if not served.constrained_decoding and "ResponseFormat" in schemas:
        schemas["ResponseFormat"]["properties"]["type"]["enum"] = ["text"]
    _upload_layers(schemas.get("PersonaUpload"), served)
    _fit_layers(schemas.get("MappingFitRequest"), served)


def _upload_layers(schema: Schema | None, served: Served) -> None:
    if schema is None:
        return
    layers = schema["properties"]["layers"]
    layers["propertyNames"] = _layer_keys(served.steerable_layers)
    low, high = served.hidden_sizes
    largest = min(largest_value(served.max_strength), _FLOAT32_MAX)
    vector = {"type": "number", "minimum": -largest, "maximum": largest}
    layers["additionalProperties"].update(minItems=low, maxItems=high, items=vector)


def _fit_layers(schema: Schema | None, served: Served) -> None:
    if schema is None:
        return
    blocks = list(range(served.blocks))
    layers = schema["properties"]["layers"]
    layers["propertyNames"] = _layer_keys(blocks)
    for option in _options(layers):
        if option.get("type") == "object":
            option["additionalProperties"] = {"type": "integer", "enum": blocks}


def complete_rules(app: FastAPI, schema: Schema) -> None:
    """State in ``schema`` the rules and, once the models are loaded, the bounds of the server."""
    fix_numeric_keywords(schema)
    drop_wire_nulls(schema)
    schemas = schema.get("components", {}).get("schemas", {})
    add_static_rules(schemas)
    served = served_facts(app)
    if served is not None:
        add_served_bounds(schemas, served)
