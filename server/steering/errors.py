"""Domain errors of the steering layer; the API layer turns them into OpenAI error objects."""

from __future__ import annotations


class SteeringError(ValueError):
    """A steering request that cannot be applied to the model it names (bad layer, size, strength)."""


class UnsupportedArchitectureError(SteeringError):
    """The model's architecture has no known list of decoder blocks."""
