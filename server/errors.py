"""The root of every bad-input error, so the API can answer 400 without importing the layer that raised.

Like ``settings`` and ``metrics``, this module imports nothing of ours: any layer may derive from it.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the server cannot serve as asked; ``param`` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineFault(RuntimeError):
    """The engine failed while it ran a request (a failed step, a dead process): the request fails
    through no fault of its own, and a retry may succeed (api: 503)."""


class EngineDied(EngineFault):
    """The engine of a model can no longer serve: its process or thread died, or its steps keep
    failing. The server restarts it (serving/engine_supervisor.py)."""
