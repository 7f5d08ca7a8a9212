from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from server.steering.errors import SteeringError
from server.steering.plan import Positions, SteeringPlan, prompt_position_mask, steers_generated_tokens


def test_deltas_are_strength_times_vector_in_float32() -> None:
    plan = SteeringPlan({3: np.arange(4, dtype=np.float64)}, strength=-1.5)
    assert plan.deltas[3].dtype == torch.float32
    assert plan.deltas[3].tolist() == [0.0, -1.5, -3.0, -4.5]
    assert plan.positions is Positions.ALL


def test_composition_sums_strength_times_vector() -> None:
    a = {0: [1.0, 0.0], 2: [0.0, 1.0]}
    b = {0: [0.0, 2.0]}
    plan = SteeringPlan.compose([(a, 2.0), (b, -0.5)], positions="response")
    assert plan.strength == 1.0 and plan.positions is Positions.RESPONSE
    assert plan.deltas[0].tolist() == [2.0, -1.0]
    assert plan.deltas[2].tolist() == [0.0, 2.0]


def test_strength_zero_is_a_noop_and_fingerprints_tell_plans_apart() -> None:
    vector = {1: [1.0, 2.0]}
    assert SteeringPlan(vector, strength=0.0).is_noop
    same = SteeringPlan(vector, strength=2.0).fingerprint()
    assert same == SteeringPlan({1: [2.0, 4.0]}).fingerprint()
    assert same != SteeringPlan(vector, strength=2.0, positions="prompt").fingerprint()


@pytest.mark.parametrize(
    ("vectors", "strength", "message"),
    [
        ({0: [[1.0, 2.0]]}, 1.0, "1-D"),
        ({0: [math.nan, 1.0]}, 1.0, "NaN"),
        ({-1: [1.0]}, 1.0, "non-negative"),
        ({0: [1.0]}, math.inf, "finite"),
    ],
)
def test_malformed_plans_are_refused(vectors: dict, strength: float, message: str) -> None:
    with pytest.raises(SteeringError, match=message):
        SteeringPlan(vectors, strength=strength)


def test_validation_against_the_model_shape() -> None:
    plan = SteeringPlan({2: torch.zeros(8)})
    plan.validate_for(num_layers=3, hidden_size=8)
    with pytest.raises(SteeringError, match=r"blocks 0\.\.1"):
        plan.validate_for(num_layers=2, hidden_size=8)
    with pytest.raises(SteeringError, match="hidden size is 16"):
        plan.validate_for(num_layers=3, hidden_size=16)


def test_position_masks() -> None:
    assert prompt_position_mask(Positions.ALL, 3).tolist() == [True, True, True]
    assert prompt_position_mask(Positions.PROMPT, 3).tolist() == [True, True, True]
    assert prompt_position_mask(Positions.RESPONSE, 3).tolist() == [False, False, True]
    assert [steers_generated_tokens(p) for p in Positions] == [True, False, True]
