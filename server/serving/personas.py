"""Turning a request's persona fields into a resolved steering plan for one target model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persona_store.base import PersonaStore
from persona_store.errors import PersonaNotFound
from persona_store.records import PersonaRecord
from server.engine.base import ModelInfo
from server.serving.completion_job import PersonaTerm, SteeringOverride
from server.serving.errors import RequestRejected
from server.steering.errors import SteeringError
from server.steering.operators import Operator, edit_bounds
from server.steering.plan import EditTerm, Positions, SteeringPlan


@dataclass(frozen=True)
class PersonaEcho:
    """What the response reports of each persona applied."""

    name: str
    strength: float | None  # None: a cap (it has bounds, no strength)
    version: int
    layers: tuple[int, ...]
    operator: str = "add"
    cap: tuple[float | None, float | None] = (None, None)  # (min, max) of a cap

    def to_dict(self) -> dict[str, object]:
        echo: dict[str, object] = {
            "name": self.name,
            "strength": self.strength,
            "version": self.version,
            "layers": list(self.layers),
        }
        if self.operator != Operator.ADD:
            echo["operator"] = self.operator
        if self.operator == Operator.CAP:
            echo["min"], echo["max"] = self.cap
        return echo


@dataclass(frozen=True)
class ResolvedPersonas:
    plan: SteeringPlan | None
    echoes: tuple[PersonaEcho, ...]

    @property
    def label(self) -> str:
        """The bounded metrics label: persona names (only admins create them), or 'none'."""
        return "+".join(echo.name for echo in self.echoes) or "none"


NO_PERSONA = ResolvedPersonas(plan=None, echoes=())


def _terms(persona: str | Sequence[PersonaTerm], persona_strength: float | None) -> list[PersonaTerm]:
    if isinstance(persona, str):
        return [PersonaTerm(persona, persona_strength)]
    if persona_strength is not None:
        raise RequestRejected(
            "persona_strength applies to a single persona; give each listed persona its own strength",
            param="persona_strength",
        )
    if not persona:
        raise RequestRejected("persona is an empty list", param="persona")
    return list(persona)


async def lookup(store: PersonaStore, model: ModelInfo, name: str, param: str) -> PersonaRecord:
    """The persona ``name`` of ``model``; an unknown one's 404 names ``param``, the request field
    that asked for it."""
    try:
        return await store.get(model.id, name)
    except PersonaNotFound as exc:
        exc.param = param
        raise


def _check_summed_strength(
    terms: list[tuple[dict[int, Any], float, str]], max_strength: float, param: str
) -> None:
    """--max-strength bounds what a block receives, not each term: a persona listed many times (or
    several at the limit) would otherwise add up past it."""
    summed: dict[int, float] = {}
    for vectors, strength, _source in terms:
        for layer in vectors:
            summed[layer] = summed.get(layer, 0.0) + abs(strength)
    layer, total = max(summed.items(), key=lambda item: item[1], default=(0, 0.0))
    if total > max_strength:
        raise RequestRejected(
            f"the composed personas' strengths add up to {total:g} at layer {layer}, beyond the limit "
            f"{max_strength:g} (--max-strength bounds the sum of |strength| at each block)",
            param=param,
        )


def _check_operator(model: ModelInfo, operator: Operator, param: str) -> None:
    if operator.value not in model.operators:
        raise RequestRejected(
            f"the {model.backend} engine serving '{model.id}' does not apply operator '{operator}' yet "
            f"(it applies: {', '.join(model.operators)}; the hf engine applies all)",
            param=param,
        )


def _term_strength(
    term: PersonaTerm, operator: Operator, record: PersonaRecord, max_strength: float, param: str
) -> float | None:
    """The strength an added or ablated term applies (a cap has none): the request's, else the
    stored default for an addition (an ablation's default is 1, never the stored strength)."""
    if operator is Operator.CAP:
        return None
    default = record.info.default_strength if operator is Operator.ADD else 1.0
    strength = default if term.strength is None else term.strength
    if not math.isfinite(strength) or abs(strength) > max_strength:
        raise RequestRejected(
            f"strength {strength} of persona '{term.name}' is outside [-{max_strength}, {max_strength}]",
            param="persona_strength" if param == "persona" else param,
        )
    return strength


def _term_layers(name: str, layers: tuple[int, ...], override: SteeringOverride | None) -> tuple[int, ...]:
    """The persona's blocks, or those the request's steering.layers picks among them."""
    if override is None or override.layers is None:
        return layers
    missing = sorted(set(override.layers) - set(layers))
    if missing:
        message = f"persona '{name}' has no vector for layers {missing}; its layers are "
        raise SteeringError(message + str(list(layers)), param="steering.layers")
    return tuple(sorted(set(override.layers)))


def _check_plan_fits(
    plan: SteeringPlan, model: ModelInfo, override: SteeringOverride | None, param: str
) -> None:
    """Refuse a plan the model cannot apply: too many edits at a block for its engine, a vector of
    the wrong size, a block it cannot steer."""
    limit = model.edits_per_block
    if limit is not None and (crowded := [b for b, listed in plan.edits.items() if len(listed) > limit]):
        raise RequestRejected(
            f"the {model.backend} engine serving '{model.id}' applies at most {limit} ablate or cap per "
            f"block; block {crowded[0]} has {len(plan.edits[crowded[0]])}",
            param=param,
        )
    plan.validate_for(model.num_layers, model.hidden_size)
    for layer in sorted({*plan.vectors, *plan.edits}):
        if layer not in model.steerable_layers:
            raise SteeringError(
                f"layer {layer} cannot be steered on model '{model.id}'{model.why_unsteerable(layer)}",
                param="steering.layers" if override is not None and override.layers is not None else param,
            )


async def resolve_personas(
    store: PersonaStore,
    model: ModelInfo,
    persona: str | Sequence[PersonaTerm] | None,
    persona_strength: float | None,
    override: SteeringOverride | None,
    max_strength: float,
    param: str = "persona",
) -> ResolvedPersonas:
    """Look up each persona for ``model`` and compose one plan; raises on unknown or bad input.
    ``param`` is the request field that names the personas."""
    if persona is None:
        if persona_strength is not None or override is not None:
            raise RequestRejected("persona_strength and steering need a persona", param="persona")
        return NO_PERSONA
    terms: list[tuple[dict[int, Any], float, str] | EditTerm] = []
    echoes, stored_positions = [], set()
    edited_blocks: set[int] = set()
    for term in _terms(persona, persona_strength):
        operator = Operator(term.operator)
        _check_operator(model, operator, param)
        record = await lookup(store, model, term.name, param)
        if operator is Operator.ADD:
            stored_positions.add(record.info.default_positions)
        strength = _term_strength(term, operator, record, max_strength, param)
        layers = _term_layers(term.name, tuple(record.vectors), override)
        vectors = {layer: record.vectors[layer] for layer in layers}
        if operator is Operator.ADD and (edited := sorted(edited_blocks & set(layers))):
            raise RequestRejected(
                f"persona '{term.name}' is added after an ablate or cap of block {edited[0]}: at a block "
                "the additions apply first, so list the added persona before the edit",
                param=param,
            )
        if operator is Operator.ADD:
            # The source names what the vectors are, so an engine holding old ones knows they are stale.
            terms.append((vectors, strength, f"{model.id}/{term.name}/{','.join(map(str, layers))}"))
        else:
            alpha, low, high = edit_bounds(operator, strength, term.cap_min, term.cap_max)
            terms.append(EditTerm(vectors, alpha, low, high))
            edited_blocks.update(layers)
        cap = (term.cap_min, term.cap_max)
        echoes.append(PersonaEcho(term.name, strength, record.info.version, layers, operator.value, cap))
    _check_summed_strength([t for t in terms if not isinstance(t, EditTerm)], max_strength, param)
    # The request's positions win; else the personas' own, when they agree; else all.
    positions = Positions(stored_positions.pop()) if len(stored_positions) == 1 else Positions.ALL
    if override is not None and override.positions is not None:
        positions = override.positions
    plan = SteeringPlan.compose(terms, positions=positions)
    _check_plan_fits(plan, model, override, param)
    return ResolvedPersonas(plan=plan, echoes=tuple(echoes))
