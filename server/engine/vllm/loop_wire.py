"""A closed loop as it travels to vLLM's workers and its token traces as they come back.

A loop request carries its ``LoopSpec`` (directions, the target's and the rules' vectors) and where
the loop stands (``LoopProgress``) in ``SamplingParams.extra_args``, so the worker that runs it holds
everything it steers and reads with; vectors go as float32 bytes in lists (msgpack carries bytes
exactly, and no integer dictionary keys). Traces come back through an RPC, as plain lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.engine.vllm.wire import pack, unpack
from server.steering.closed_loop import Direction, LoopProgress, LoopSpec, Rule, Target, TokenTrace
from server.steering.plan import Positions

LOOP_KEY = "persona_server_loop"


def _vectors_out(vectors: Mapping[int, torch.Tensor]) -> list[list[Any]]:
    return [[int(block), pack(vector.float().numpy())] for block, vector in vectors.items()]


def _vectors_in(packed: list[list[Any]]) -> dict[int, torch.Tensor]:
    return {int(block): torch.from_numpy(unpack(data, np.float32)) for block, data in packed}


def _direction_out(direction: Direction) -> dict[str, Any]:
    return {"name": direction.name, "units": _vectors_out(direction.units)}


def _direction_in(data: dict[str, Any]) -> Direction:
    return Direction(str(data["name"]), _vectors_in(data["units"]))


def _target_out(target: Target) -> dict[str, Any]:
    return {
        "direction": _direction_out(target.direction),
        "vectors": _vectors_out(target.vectors),
        "numbers": [target.score, target.initial_strength, target.max_strength, target.gain],
        "response_strength": target.response_strength,
    }


def _target_in(data: dict[str, Any]) -> Target:
    score, initial, bound, gain = (float(value) for value in data["numbers"])
    start = data["response_strength"]
    return Target(
        _direction_in(data["direction"]),
        _vectors_in(data["vectors"]),
        score,
        initial,
        bound,
        gain,
        response_strength=None if start is None else float(start),
    )


def _rule_out(rule: Rule) -> dict[str, Any]:
    return {
        "monitor": _direction_out(rule.monitor),
        "threshold": rule.threshold,
        "above": rule.above,
        "steer_name": rule.steer_name,
        "vectors": _vectors_out(rule.vectors),
        "strength": rule.strength,
        "for_tokens": rule.for_tokens,
        "positions": rule.positions.value,
    }


def _rule_in(data: dict[str, Any]) -> Rule:
    for_tokens = data["for_tokens"]
    return Rule(
        monitor=_direction_in(data["monitor"]),
        threshold=float(data["threshold"]),
        above=bool(data["above"]),
        steer_name=str(data["steer_name"]),
        vectors=_vectors_in(data["vectors"]),
        strength=float(data["strength"]),
        for_tokens=None if for_tokens is None else int(for_tokens),
        positions=Positions(data["positions"]),
    )


@dataclass(frozen=True)
class LoopRef:
    """A request's loop as a worker runs it: the spec, where it stands, the rules that fired on the
    prompt (added to its prompt at their own positions) and the key its traces are kept under."""

    token: str
    spec: LoopSpec
    progress: LoopProgress | None = None  # None: the worker reads the prompt's pass itself
    prompt_rules: tuple[int, ...] = ()

    def to_extra_args(self) -> dict[str, object]:
        spec = self.spec
        progress = self.progress
        entry = {
            "token": self.token,
            "token_scores": [_direction_out(direction) for direction in spec.token_scores],
            "target": None if spec.target is None else _target_out(spec.target),
            "rules": [_rule_out(rule) for rule in spec.rules],
            "static": _vectors_out(spec.static),
            "progress": None
            if progress is None
            else [
                progress.strength,
                progress.read_once,
                [list(a) for a in progress.active],
                list(progress.spent),
            ],
            "prompt_rules": list(self.prompt_rules),
        }
        return {LOOP_KEY: entry}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> LoopRef | None:
        entry = (extra_args or {}).get(LOOP_KEY)
        if not isinstance(entry, dict):
            return None
        spec = LoopSpec(
            token_scores=tuple(_direction_in(d) for d in entry["token_scores"]),
            target=None if entry["target"] is None else _target_in(entry["target"]),
            rules=tuple(_rule_in(rule) for rule in entry["rules"]),
            static=_vectors_in(entry["static"]),
        )
        progress = None
        if entry["progress"] is not None:
            strength, read_once, active, spent = entry["progress"]
            progress = LoopProgress(
                None if strength is None else float(strength),
                bool(read_once),
                tuple((int(rule), int(ran)) for rule, ran in active),
                tuple(int(rule) for rule in spent),
            )
        return cls(str(entry["token"]), spec, progress, tuple(int(i) for i in entry["prompt_rules"]))


def trace_out(trace: TokenTrace) -> list[Any]:
    return [dict(trace.scores), trace.strength, list(trace.rules)]


def trace_in(data: list[Any]) -> TokenTrace:
    scores, strength, rules = data
    return TokenTrace(
        {str(name): float(value) for name, value in scores.items()},
        None if strength is None else float(strength),
        tuple(int(rule) for rule in rules),
    )
