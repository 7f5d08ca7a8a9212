"""Closed-loop steering: read personas' projections as the model writes, and steer from them.

One ``LoopSpec`` per request, one ``SteeringLoop`` per answer. Every forward pass that chooses a token
hands the loop the outputs of the leading blocks at the position the token is chosen from (the last
prompt token for the first answer token, then each generated token as it is fed back). The loop:

- reads each named direction there: the mean over the persona's blocks of the block output, minus
  what the request's own steering added to the residual stream up to that block in that pass (an
  addition to block l's output is carried unchanged by the residual connections of every later
  block), dotted with the unit vector. The additions are taken out because they show the push, not
  the model's answer to it: with nothing steered before the read block, the reading equals, position
  by position, an unsteered read-back of the same tokens (what the answer-level ``persona_scores``
  average);
- with a target, sets the target persona's strength for the next pass by an integral controller on
  the error ``target - reading`` (bounded), so that the mean reading over the answer tracks the target;
- with rules, turns a rule's steering on for the next pass when its reading crosses the threshold,
  and off after ``for_tokens`` passes, or (without ``for_tokens``) when the reading drops back. A rule
  that fires on the prompt's reading steers the answer from its first token: the engine runs the
  prompt again with the rule's vectors added at its last token.

Nothing here runs a model: engines feed readings in and take additions out (``deltas``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from server.steering.errors import SteeringError
from server.steering.plan import Positions, steers_generated_tokens

# The target controller's gain when the request names none: in development runs on the demo models, a
# gain of 0.5 swung the strength of generated tokens far enough to wreck the text
# (docs/results/closed-loop.md).
DEFAULT_GAIN = 0.1


@dataclass(frozen=True)
class Direction:
    """A persona read in flight: block -> unit vector (float32)."""

    name: str
    units: Mapping[int, torch.Tensor]

    @classmethod
    def of(cls, name: str, vectors: Mapping[int, torch.Tensor]) -> Direction:
        units = {}
        for block, vector in vectors.items():
            norm = float(torch.linalg.vector_norm(vector.float()))
            if norm > 0:
                units[int(block)] = (vector.float() / norm).contiguous()
        if not units:
            raise SteeringError(f"persona '{name}' has no non-zero vector to read")
        return cls(name, dict(sorted(units.items())))

    def read(self, outputs: torch.Tensor, pushed: Mapping[int, torch.Tensor]) -> float:
        """``outputs`` [blocks, hidden] of one position; ``pushed``: block -> what steering added to
        the residual stream up to and including that block (``pushed_by``)."""
        total = 0.0
        for block, unit in self.units.items():
            value = outputs[block].float()
            added = pushed.get(block)
            if added is not None:
                value = value - added
            total += float(value @ unit)
        return total / len(self.units)


@dataclass(frozen=True)
class Target:
    """Hold ``direction``'s reading at ``score`` by steering with ``vectors`` at a strength in
    [-max_strength, max_strength]; the strength moves by ``gain / |vector|`` per unit of error.

    ``initial_strength`` steers the prompt; the generated tokens start from ``response_strength``
    (what a fixed request of the persona adds there: its strength, or 0 when it steers the prompt only)
    and move from the first reading on."""

    direction: Direction
    vectors: Mapping[int, torch.Tensor]
    score: float
    initial_strength: float
    max_strength: float
    gain: float
    response_strength: float | None = None  # None: initial_strength

    def __post_init__(self) -> None:
        for name in ("score", "initial_strength", "max_strength", "gain", "start"):
            if not math.isfinite(getattr(self, name)):
                raise SteeringError(f"persona_target {name} must be a finite number")
        if self.max_strength <= 0:
            raise SteeringError("persona_target max_strength must be positive")
        if self.gain <= 0:
            raise SteeringError("persona_target gain must be positive")

    @property
    def start(self) -> float:
        """The strength the generated tokens start from."""
        return self.initial_strength if self.response_strength is None else self.response_strength

    @cached_property  # read at every token
    def step_per_unit(self) -> float:
        """Strength change per unit of reading error: ``gain`` over the vectors' mean norm, so that
        gain 1 moves the strength by what would push the read block by the error directly."""
        norms = [float(torch.linalg.vector_norm(v)) for v in self.vectors.values()]
        return self.gain / max(sum(norms) / len(norms), 1e-12)


@dataclass(frozen=True)
class Rule:
    """When ``monitor``'s reading is above (``above`` True) or below ``threshold``, add
    ``strength * vectors`` from the next pass on: for ``for_tokens`` passes, or (None) until the
    reading drops back."""

    monitor: Direction
    threshold: float
    above: bool
    steer_name: str
    vectors: Mapping[int, torch.Tensor]
    strength: float
    for_tokens: int | None = None
    # Where the steered persona steers when the rule fires on the prompt (its own positions); fired in
    # the answer, it steers the generated tokens.
    positions: Positions = Positions.ALL

    def crossed(self, reading: float) -> bool:
        return reading > self.threshold if self.above else reading < self.threshold


@dataclass(frozen=True)
class LoopSpec:
    """A request's closed loop: directions reported per token, a target, rules. ``static`` holds the
    additions of the request's fixed personas on generated tokens (block -> strength * vector)."""

    token_scores: tuple[Direction, ...] = ()
    target: Target | None = None
    rules: tuple[Rule, ...] = ()
    static: Mapping[int, torch.Tensor] = field(default_factory=dict)

    def directions(self) -> list[Direction]:
        found = list(self.token_scores)
        if self.target is not None:
            found.append(self.target.direction)
        found += [rule.monitor for rule in self.rules]
        return found

    @property
    def num_blocks(self) -> int:
        """How many leading blocks each reading needs."""
        return 1 + max(block for direction in self.directions() for block in direction.units)

    @property
    def steered_blocks(self) -> set[int]:
        """Every block the loop may add to at some token."""
        blocks = set(self.static)
        if self.target is not None:
            blocks |= set(self.target.vectors)
        for rule in self.rules:
            blocks |= set(rule.vectors)
        return blocks


@dataclass(frozen=True)
class TokenTrace:
    """What the loop saw and did at one answer token (the pass that chose it)."""

    scores: Mapping[str, float]  # the token-score directions' readings
    strength: float | None  # the target persona's strength in that pass
    rules: tuple[int, ...]  # rules whose steering applied in that pass


@dataclass(frozen=True)
class LoopProgress:
    """Where a ``SteeringLoop`` stands between passes: enough to carry it to another process (an
    engine's worker) and go on there."""

    strength: float | None
    read_once: bool
    active: tuple[tuple[int, int], ...]  # (rule, passes it has steered in a row)
    spent: tuple[int, ...]


class SteeringLoop:
    """One answer's loop state: the strengths of the current pass and the rules that are on."""

    def __init__(self, spec: LoopSpec, progress: LoopProgress | None = None) -> None:
        self.spec = spec
        self.strength = spec.target.initial_strength if spec.target is not None else None
        self._read_once = False  # the prompt's pass is read first; generated tokens follow
        self._active: dict[int, int] = {}  # rule -> passes it steers in a row, counting the current one
        self._spent: set[int] = set()  # rules that steered the whole answer through the prompt
        if progress is not None:
            self.strength = progress.strength
            self._read_once = progress.read_once
            self._active = dict(progress.active)
            self._spent = set(progress.spent)
        self._deltas = self._compose()

    def progress(self) -> LoopProgress:
        return LoopProgress(
            self.strength, self._read_once, tuple(sorted(self._active.items())), tuple(sorted(self._spent))
        )

    @property
    def read_prompt(self) -> bool:
        """Whether the prompt's pass has been read (the next reading is a generated token's)."""
        return self._read_once

    def deltas(self) -> dict[int, torch.Tensor]:
        """block -> what this answer adds to the block's output in the current pass (float32)."""
        return self._deltas

    @property
    def rules_on(self) -> tuple[int, ...]:
        """The rules that steer the current pass."""
        return tuple(sorted(self._active))

    def rerun(self) -> None:
        """The prompt was run again with the rules that fired on it (``prompt_rules``): that pass
        counts as one of their ``for_tokens``; a rule without holds on the reading that turned it on; a
        rule whose persona steers the prompt only has steered the whole answer and fires no more."""
        for index in self.rules_on:
            rule = self.spec.rules[index]
            if not steers_generated_tokens(rule.positions):
                del self._active[index]
                self._spent.add(index)
                continue
            self._update_rule(index, rule, crossed=rule.for_tokens is None)
        self._deltas = self._compose()

    def prompt_rules(self) -> list[tuple[dict[int, torch.Tensor], Positions]]:
        """What the rules that are on add to the prompt when they fire on it: each persona at its
        strength and its own positions, as if the request had carried it (CAST's use: a prompt that
        shows a trait gets the answer steered)."""
        parts = []
        for index in self.rules_on:
            rule = self.spec.rules[index]
            parts.append(({block: v * rule.strength for block, v in rule.vectors.items()}, rule.positions))
        return parts

    def _compose(self) -> dict[int, torch.Tensor]:
        deltas = {block: delta.clone() for block, delta in self.spec.static.items()}
        terms: list[tuple[Mapping[int, torch.Tensor], float]] = []
        target = self.spec.target
        if target is not None and self.strength:
            terms.append((target.vectors, self.strength))
        terms += [(self.spec.rules[i].vectors, self.spec.rules[i].strength) for i in sorted(self._active)]
        for vectors, strength in terms:
            for block, vector in vectors.items():
                scaled = vector * strength
                deltas[block] = deltas[block] + scaled if block in deltas else scaled
        return deltas

    def observe(
        self, outputs: torch.Tensor, additions: Mapping[int, torch.Tensor] | None = None
    ) -> TokenTrace:
        """Readings of the pass that chose a token (``outputs`` [num_blocks, hidden] at the position it
        was chosen from); sets the next pass's steering and returns this token's trace. ``additions``:
        what that pass added per block, when not this loop's ``deltas`` (the prompt's pass)."""
        pushed = pushed_by(self._deltas if additions is None else additions, self.spec.num_blocks)
        readings = {d.name: d.read(outputs, pushed) for d in self.spec.directions()}
        trace = TokenTrace(
            scores={d.name: readings[d.name] for d in self.spec.token_scores},
            strength=self.strength,
            rules=tuple(sorted({*self._active, *self._spent})),  # a spent rule steered the prompt
        )
        target = self.spec.target
        if target is not None:
            assert self.strength is not None
            base = self.strength if self._read_once else target.start
            moved = base + target.step_per_unit * (target.score - readings[target.direction.name])
            self.strength = min(max(moved, -target.max_strength), target.max_strength)
        self._read_once = True
        for index, rule in enumerate(self.spec.rules):
            self._update_rule(index, rule, rule.crossed(readings[rule.monitor.name]))
        self._deltas = self._compose()
        return trace

    def _update_rule(self, index: int, rule: Rule, crossed: bool) -> None:
        """After a pass: a rule with ``for_tokens`` steers that many passes once it fires, whatever the
        readings meanwhile (they would show its own push); one without steers while its reading stays
        past the threshold. Either fires (again) on a reading past the threshold."""
        if index in self._spent:
            return
        ran = self._active.get(index)  # passes it has steered, counting the one just run
        if ran is not None:
            if rule.for_tokens is None:
                if crossed:
                    return
            elif ran < rule.for_tokens:
                self._active[index] = ran + 1
                return
            del self._active[index]
        if crossed:
            self._active[index] = 1


def pushed_by(additions: Mapping[int, torch.Tensor], num_blocks: int) -> dict[int, torch.Tensor]:
    """block -> the sum of the additions to it and every earlier block: what the residual stream
    after that block holds of them (for blocks from the first steered one to ``num_blocks - 1``)."""
    if not additions:
        return {}
    pushed: dict[int, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for block in range(min(additions), num_blocks):
        if block in additions:
            total = additions[block] if total is None else total + additions[block]
        pushed[block] = total  # type: ignore[assignment]
    return pushed


def fired_runs(rules_per_token: Sequence[tuple[int, ...]]) -> list[dict[str, int]]:
    """Each run of consecutive answer tokens a rule steered: ``{"rule", "token", "tokens"}`` where
    ``token`` is the first steered token's index in the answer."""
    runs: list[dict[str, int]] = []
    open_runs: dict[int, dict[str, int]] = {}
    for token, rules in enumerate(rules_per_token):
        for rule in list(open_runs):
            if rule not in rules:
                del open_runs[rule]
        for rule in rules:
            if rule in open_runs:
                open_runs[rule]["tokens"] += 1
            else:
                open_runs[rule] = {"rule": rule, "token": token, "tokens": 1}
                runs.append(open_runs[rule])
    return sorted(runs, key=lambda run: (run["token"], run["rule"]))
