"""The server's refusals that /openapi.json cannot state, for schemathesis (SCHEMATHESIS_HOOKS).

/openapi.json states every bound, pattern and rule between fields that JSON Schema can
(server/api/openapi_rules.py). What is left compares two values of a request, or depends on what
the server stores or on how a model tokenizes. A "schema-valid request rejected" (ST202) failure is
dropped only when the request breaks one of the rules below *and* the server's error names that
rule's field as its param: a refusal for any other reason still fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import schemathesis

Body = dict[str, Any]
Rule = tuple[str, Callable[[Body], bool], frozenset[str]]


def _prompts(body: Body) -> int:
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, list) else 1


def _max_tokens(body: Body) -> int | None:
    value = body.get("max_tokens")
    return value if value is not None else body.get("max_completion_tokens")


def _persona_names(body: Body) -> set[str]:
    persona = body.get("persona")
    if isinstance(persona, str):
        return {persona}
    return {term.get("name") for term in persona or () if isinstance(term, dict)}


def _always(_body: Body) -> bool:
    return True


def _best_of_not_n(body: Body) -> bool:
    return body.get("best_of") not in (None, body.get("n", 1))


def _min_over_max(body: Body) -> bool:
    # Without max_tokens the server's default length applies (the test passes it in the environment).
    limit = _max_tokens(body) or int(os.environ["PERSONA_DEFAULT_MAX_TOKENS"])
    return (body.get("min_tokens") or 0) > limit


def _target_also_fixed(body: Body) -> bool:
    return (body.get("persona_target") or {}).get("name") in _persona_names(body)


def _cap_fields_clash(body: Body) -> bool:
    """A single persona's operator, strength and cap bounds that do not go together
    (serving/persona_terms.py): a cap needs a bound and takes no strength, bounds belong to a cap,
    min is not above max; they need a single persona; and an edit takes no closed-loop field yet
    (completions.py)."""
    low, high = body.get("persona_cap_min"), body.get("persona_cap_max")
    bounded = low is not None or high is not None
    operator = body.get("persona_operator") or ("cap" if bounded else "add")
    looped = body.get("persona_target") or body.get("persona_when") or body.get("persona_monitor_tokens")
    if operator != "add" and looped:
        return True
    if (body.get("persona_operator") is not None or bounded) and not isinstance(body.get("persona"), str):
        return True  # the single-persona fields, without a single persona
    if operator != "cap":
        return bounded
    crossed = low is not None and high is not None and low > high
    return not bounded or body.get("persona_strength") is not None or crossed


def _same_models(body: Body) -> bool:
    return body.get("source_model") == body.get("target_model")


# (operation, the request breaks the rule, the params the server's refusal may name)
RULES: list[Rule] = [
    # Two values of one request (routes/openai.py, the engines' sampling checks, completions.py,
    # steering_loops.py, mapping_fits.py): best_of = n, min_tokens <= max_tokens (or the default
    # length, which the schema could state but schemathesis then cannot generate from it), n times the
    # prompts within the answers a model runs at once (n alone is bounded in the schema), a
    # persona not both fixed and targeted, a single persona's operator against its cap bounds and
    # strength (JSON Schema could state most of it, but each if/then doubles what schemathesis
    # generates from, and it gives up past a few), a map between two models, enough texts for the
    # folds.
    ("/completions", _best_of_not_n, frozenset({"best_of"})),
    ("/completions", _min_over_max, frozenset({"min_tokens"})),
    ("/v1/completions", lambda body: _prompts(body) > 1, frozenset({"n"})),
    ("/completions", _target_also_fixed, frozenset({"persona_target"})),
    (
        "/completions",
        _cap_fields_clash,
        frozenset({"persona_operator", "persona_strength", "persona_cap_max"}),
    ),
    ("/admin/mappings", _same_models, frozenset({"target_model"})),
    ("/admin/mappings", lambda body: body.get("texts") is not None, frozenset({"texts"})),
    # What the server stores: a persona's layers and strengths, the blocks a file format can hold,
    # which models were baked.
    ("/completions", _always, frozenset({"steering.layers", "persona", "persona_strength"})),
    ("/completions", _always, frozenset({"persona_target", "persona_when"})),
    ("/export", _always, frozenset({"format"})),
    ("/admin/models/", _always, frozenset({"model"})),
    # How a model tokenizes: an extraction's questions must fit its context with their system prompts.
    ("/extract", _always, frozenset({"questions", "positive_prompts", "negative_prompts"})),
    # A vector file's content is binary the schema cannot describe.
    ("/import", _always, frozenset({"file", "format", "layers"})),
]


def _refused_param(response: Any) -> tuple[bool, str | None]:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False, None
    return True, error.get("param")


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but an ST202 refusal that one of RULES explains."""
    if getattr(failure, "code", None) != "ST202":
        return True
    is_error, param = _refused_param(response)
    body = case.body if isinstance(case.body, dict) else {}
    explained = any(path in case.path and broken(body) and param in params for path, broken, params in RULES)
    return not (is_error and explained)
