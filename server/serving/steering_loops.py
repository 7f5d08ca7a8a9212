"""A job's closed loop: its persona fields resolved into a ``LoopSpec``, and what the answer reports.

``persona_monitor_tokens`` reads the monitored personas at every token, ``persona_target`` holds a
persona's reading at a score by setting its strength token by token, ``persona_when`` steers with a
persona while another one's reading is past a threshold. The maths is in steering/closed_loop.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from persona_store.base import PersonaStore
from server.engine.base import ModelInfo
from server.serving.completion_job import CompletionJob, TargetTerm, WhenRule
from server.serving.errors import RequestRejected
from server.serving.monitoring import Monitor
from server.serving.personas import PersonaEcho, ResolvedPersonas, lookup, resolve_personas
from server.steering.closed_loop import Direction, LoopSpec, Rule, Target, TokenTrace, fired_runs
from server.steering.plan import SteeringPlan, steers_generated_tokens

# The target's bound when the request names none: this many times the persona's default strength (the
# demo personas are calibrated on the prompt; steering their generated tokens at that strength already
# wrecks the text where a rule does it, docs/results/closed-loop.md, so the target goes no further).
DEFAULT_MAX_MULTIPLE = 1.0


@dataclass(frozen=True)
class LoopPlan:
    """A job's loop, the steering of its prompt (the fixed personas and the target's first strength)
    and the target persona as the answer reports it."""

    spec: LoopSpec
    prompt_plan: SteeringPlan | None
    target_echo: PersonaEcho | None = None


def _direction(name: str, vectors: dict[int, np.ndarray] | Any) -> Direction:
    return Direction.of(
        name, {block: torch.as_tensor(v, dtype=torch.float32) for block, v in vectors.items()}
    )


def _monitor_direction(monitor: Monitor) -> Direction:
    return _direction(monitor.name, monitor.directions)


async def _target(
    store: PersonaStore, model: ModelInfo, term: TargetTerm, limit: float
) -> tuple[Target, SteeringPlan, PersonaEcho]:
    record = await lookup(store, model, term.name, "persona_target")
    bound = term.max_strength
    if bound is None:
        bound = min(DEFAULT_MAX_MULTIPLE * abs(record.info.default_strength), limit) or limit
    if bound > limit:
        raise RequestRejected(
            f"persona_target max_strength {bound} is above this server's limit {limit}",
            param="persona_target",
        )
    resolved = await resolve_personas(store, model, term.name, term.strength, None, limit, "persona_target")
    assert resolved.plan is not None
    vectors = resolved.plan.terms[0].vectors
    echo = resolved.echoes[0]
    # Generated tokens start where a fixed request of the persona has them: at its strength when its
    # positions reach them, else unsteered.
    start = echo.strength if steers_generated_tokens(resolved.plan.positions) else 0.0
    direction = _direction(term.name, vectors)
    target = Target(direction, vectors, term.score, echo.strength, bound, term.gain, response_strength=start)
    return target, resolved.plan, echo


async def _rule(store: PersonaStore, model: ModelInfo, rule: WhenRule, limit: float) -> Rule:
    monitored = await lookup(store, model, rule.monitor, "persona_when")
    steer = await resolve_personas(
        store, model, rule.steer.name, rule.steer.strength, None, limit, "persona_when"
    )
    assert steer.plan is not None
    return Rule(
        monitor=_direction(rule.monitor, _in_model(monitored.vectors, model)),
        threshold=rule.threshold,
        above=rule.above,
        steer_name=rule.steer.name,
        vectors=steer.plan.terms[0].vectors,
        strength=steer.echoes[0].strength,
        for_tokens=rule.for_tokens,
        positions=steer.plan.positions,
    )


def _in_model(vectors: dict[int, np.ndarray], model: ModelInfo) -> dict[int, np.ndarray]:
    return {block: vector for block, vector in vectors.items() if block < model.num_layers}


def check_loop(job: CompletionJob, model: ModelInfo) -> None:
    """Refuse a closed loop the job's shape or the engine cannot serve, naming the field."""
    param = (
        "persona_target"
        if job.persona_target is not None
        else "persona_when"
        if job.persona_when
        else "persona_monitor_tokens"
    )
    if job.monitor_tokens and not job.persona_monitor:
        raise RequestRejected("persona_monitor_tokens needs persona_monitor", param="persona_monitor_tokens")
    if job.n * len(job.prompts) > 1:
        message = f"{param} follows one answer: it cannot be combined with n > 1 or several prompts"
        raise RequestRejected(message, param="n" if job.n > 1 else "prompt")
    if not model.closed_loop:
        raise RequestRejected(
            f"{param} reads the model as it writes; the {model.backend} engine serving {model.id} "
            "cannot (closed loops run on the hf engine, on vllm with one pipeline stage, and on "
            "llama.cpp with a per-row lane)",
            param=param,
        )
    if job.persona_target is not None and job.persona_target.name in _static_names(job):
        raise RequestRejected(
            f"persona '{job.persona_target.name}' is both in persona and persona_target",
            param="persona_target",
        )


def _static_names(job: CompletionJob) -> set[str]:
    if job.persona is None:
        return set()
    return {job.persona} if isinstance(job.persona, str) else {term.name for term in job.persona}


async def plan_loop(
    store: PersonaStore,
    model: ModelInfo,
    job: CompletionJob,
    personas: ResolvedPersonas,
    monitors: Sequence[Monitor],
    limit: float,
) -> LoopPlan | None:
    """The job's loop (None when it has none); unknown personas and bad strengths raise."""
    if not job.closed_loop:
        return None
    check_loop(job, model)
    fixed = personas.plan
    static = fixed.deltas if fixed is not None and steers_generated_tokens(fixed.positions) else {}
    target = prompt_plan = echo = None
    if job.persona_target is not None:
        target, target_plan, echo = await _target(store, model, job.persona_target, limit)
        prompt_plan = _with_target(fixed, target_plan)
    rules = tuple([await _rule(store, model, rule, limit) for rule in job.persona_when])
    token_scores = (
        tuple(_monitor_direction(m) for m in monitors if m.directions) if job.monitor_tokens else ()
    )
    spec = LoopSpec(token_scores=token_scores, target=target, rules=rules, static=dict(static))
    return LoopPlan(spec, prompt_plan if prompt_plan is not None else fixed, echo)


def _with_target(fixed: SteeringPlan | None, target: SteeringPlan) -> SteeringPlan:
    """The prompt's steering: the fixed personas and the target at its first strength, at the fixed
    personas' positions (else the target persona's own)."""
    if fixed is None:
        return target
    terms = [(term.vectors, term.strength, term.source) for term in (*fixed.terms, *target.terms)]
    return SteeringPlan.compose(terms, positions=fixed.positions)


@dataclass
class LoopReport:
    """What an answer reports of its loop, gathered from its chunks' traces."""

    plan: LoopPlan
    scores: dict[str, list[float]] = field(default_factory=dict)
    strengths: list[float] = field(default_factory=list)
    rules: list[tuple[int, ...]] = field(default_factory=list)

    def add(self, traces: Sequence[TokenTrace]) -> dict[str, Any]:
        """Record a chunk's traces; returns the chunk's own fields."""
        fields: dict[str, Any] = {}
        spec = self.plan.spec
        if spec.token_scores:
            chunk = {d.name: [trace.scores[d.name] for trace in traces] for d in spec.token_scores}
            for name, values in chunk.items():
                self.scores.setdefault(name, []).extend(values)
            fields["persona_token_scores"] = chunk
        if spec.target is not None:
            chunk_strengths = [float(trace.strength or 0.0) for trace in traces]
            self.strengths += chunk_strengths
            fields["persona_target_strengths"] = chunk_strengths
        self.rules += [trace.rules for trace in traces]
        return fields

    def final(self) -> dict[str, Any]:
        """The whole answer's fields (a non-streamed response)."""
        fields: dict[str, Any] = {}
        if self.plan.spec.token_scores:
            fields["persona_token_scores"] = self.scores
        if self.plan.spec.target is not None:
            fields["persona_target_strengths"] = self.strengths
        return {**fields, **self.fired()}

    def fired(self) -> dict[str, Any]:
        """The rules' runs, on the last chunk and in a whole response (when the job has rules)."""
        return {"persona_when_fired": fired_runs(self.rules)} if self.plan.spec.rules else {}

    def target_echo(self) -> dict[str, Any] | None:
        """The target persona as applied: its mean strength over the answer's tokens so far."""
        echo = self.plan.target_echo
        target = self.plan.spec.target
        if echo is None or target is None:
            return None
        mean = float(np.mean(self.strengths)) if self.strengths else echo.strength
        return {**echo.to_dict(), "strength": mean, "target_score": target.score}
