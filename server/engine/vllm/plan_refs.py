"""A steering plan as vLLM's workers know it: references to the vector sets they hold
(``wire.SteeringRef``), the cache salt that keeps its KV cache its own, and the slots it takes."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from server.engine.sequence import Sequence
from server.engine.vllm.slot_gate import LOOP_DEMAND
from server.engine.vllm.wire import SteeringRef, slot_key
from server.steering.plan import PlanTerm, SteeringPlan


def edit_term(plan: SteeringPlan) -> PlanTerm | None:
    """The plan's edits as one vector set the workers hold like any other: block -> its unit
    direction followed by (alpha, low, high). The workers apply one edit per block (the engine
    refuses more); None when the plan edits nothing."""
    if not plan.edits:
        return None
    vectors = {}
    for block, (edit, *more) in plan.edits.items():
        if more:
            raise ValueError(
                f"the vllm engine applies one ablate or cap per block; block {block} has {1 + len(more)}"
            )
        params = torch.tensor([edit.alpha, edit.low, edit.high], dtype=torch.float32)
        vectors[block] = torch.cat([edit.unit, params])
    return PlanTerm(vectors, 0.0)


def cache_salt(plan: SteeringPlan, num_prompt_tokens: int) -> str:
    """What keeps a plan's KV cache its own: its terms and positions. Under ``prompt`` and
    ``response`` which cached positions were steered depends on the prompt's length, so it is in
    the salt too; unsteered requests carry no salt and share prefixes as before."""
    terms = "+".join(f"{term.key}*{term.strength!r}" for term in plan.terms)
    length = "" if plan.positions.value == "all" else f"@{num_prompt_tokens}"
    edit = edit_term(plan)
    edited = "" if edit is None else f"|edit:{edit.key}"
    return f"persona:{plan.positions.value}{length}:{terms}{edited}"


def plan_ref(plan: SteeringPlan) -> SteeringRef:
    """A plan as the workers know it: references to the sets they hold, strengths, positions."""
    edit = edit_term(plan)
    terms = tuple((term.key, term.strength) for term in plan.terms)
    return SteeringRef(terms, plan.positions.value, None if edit is None else edit.key)


def steering_args(plan: SteeringPlan | None) -> dict[str, Any]:
    """What a request steered by ``plan`` tells the workers."""
    return {} if plan is None else plan_ref(plan).to_extra_args()


def slots_wanted(sequence: Sequence) -> dict[Hashable, int]:
    """The workers' steering slots a request takes while it runs (slot_gate.py): its plan's, shared
    by every request with that plan, and a closed loop's own."""
    wanted: dict[Hashable, int] = {}
    if sequence.plan is not None:
        ref = plan_ref(sequence.plan)
        wanted[slot_key(ref)[0]] = 1
        if ref.edit is not None:  # an edit takes a slot of the edit table (counted with the others)
            wanted[("edit", ref.edit)] = 1
    if sequence.loop is not None:
        wanted[object()] = LOOP_DEMAND
    return wanted
