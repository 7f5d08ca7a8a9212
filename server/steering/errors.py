"""Domain errors of the steering layer; the API layer turns them into OpenAI error objects."""

from __future__ import annotations


class SteeringError(ValueError):
    """A steering request that cannot be applied to the model it names (bad layer, size, strength);
    ``param`` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedArchitectureError(SteeringError):
    """The model's architecture has no known list of decoder blocks."""
