"""A request's persona fields as a completion job takes them: each persona a term with its
operator (add, ablate or cap: server/steering/operators.py), refused with a 400 naming the field
where the fields do not go together."""

from __future__ import annotations

from server.serving.completion_job import PersonaTerm
from server.serving.errors import RequestRejected


def persona_term(
    name: str,
    strength: float | None,
    operator: str | None,
    cap_max: float | None,
    cap_min: float | None,
    params: tuple[str, str, str] = ("persona", "persona", "persona"),
) -> PersonaTerm:
    """A persona term as a request gives it, refused where the fields do not go together, naming
    ``params``: the fields of the operator, the strength and the bounds. Bounds without an operator
    ask for a cap."""
    operator_param, strength_param, bound_param = params
    bounded = cap_max is not None or cap_min is not None
    operator = operator or ("cap" if bounded else "add")
    if bounded and operator != "cap":
        raise RequestRejected(
            f"max and min bound a cap, not an {operator} of persona '{name}'", param=bound_param
        )
    if operator == "cap":
        if not bounded:
            raise RequestRejected(f"the cap of persona '{name}' needs max, min or both", param=operator_param)
        if strength is not None:
            raise RequestRejected(
                f"the cap of persona '{name}' takes no strength (it clamps the reading into [min, max])",
                param=strength_param,
            )
        if cap_max is not None and cap_min is not None and cap_min > cap_max:
            raise RequestRejected(
                f"the cap of persona '{name}' has min {cap_min:g} above max {cap_max:g}", param=bound_param
            )
    return PersonaTerm(name, strength, operator, cap_max, cap_min)


def persona_fields(
    single: str | None,
    listed: list[PersonaTerm] | None,
    strength: float | None,
    operator: str | None,
    cap_max: float | None,
    cap_min: float | None,
) -> tuple[str | list[PersonaTerm] | None, float | None]:
    """(persona, persona_strength) for the job: a single persona with an operator (or cap bounds)
    becomes one term, its fields checked under the top-level names; a list keeps its own terms."""
    operated = operator is not None or cap_max is not None or cap_min is not None
    if listed is not None:
        if operated:
            raise RequestRejected(
                "persona_operator and persona_cap_* apply to a single persona; give each listed persona "
                "its own operator, max and min",
                param="persona_operator",
            )
        return listed, strength
    if not operated:
        return single, strength
    if single is None:
        raise RequestRejected("persona_operator and persona_cap_* need a persona", param="persona_operator")
    params = ("persona_operator", "persona_strength", "persona_cap_max")
    return [persona_term(single, strength, operator, cap_max, cap_min, params)], None
