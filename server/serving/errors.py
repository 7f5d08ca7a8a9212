"""Errors of the serving layer; api/errors.py gives each its HTTP status and OpenAI error object."""

from __future__ import annotations

from server.errors import InvalidRequest


class ModelNotFound(LookupError):
    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(f"the model '{model}' does not exist; served models: {', '.join(served)}")
        self.model = model


class ModelExists(Exception):
    """A new served model would take a name already served (api: 409 model_exists)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"a model named '{model}' is already served; choose another name")
        self.model = model


class RequestRejected(InvalidRequest):
    """A request outside the server's limits (strength cap, max_tokens cap, conflicting fields)."""


class PersonaExists(Exception):
    """A write would replace a persona the request did not ask to replace (api: 409 persona_exists)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(Exception):
    """Every batch row and queue place of a model is taken; the client should retry later."""

    def __init__(self, model: str, retry_after_seconds: int = 1, message: str | None = None) -> None:
        super().__init__(message or f"model '{model}' has too many requests in flight; retry later")
        self.retry_after_seconds = retry_after_seconds


class EngineRestarting(Exception):
    """The engine of a model died and is being restarted; the client should retry later (api: 503)."""

    def __init__(self, model: str, reason: str, retry_after_seconds: int = 5) -> None:
        super().__init__(f"the engine of model '{model}' is restarting ({reason}); retry later")
        self.model = model
        self.retry_after_seconds = retry_after_seconds


class JobQueueFull(Overloaded):
    """Every running place of a kind of admin work and every queue place is taken (api: 429)."""

    def __init__(self, kind: str, queued: int, retry_after_seconds: int) -> None:
        message = f"no place for another {kind} job: the running places are taken and {queued} jobs wait"
        super().__init__("", retry_after_seconds, f"{message}; retry later")


class ModelInUse(Exception):
    """A model cannot be deleted while work runs or waits on it (api: 409 model_in_use)."""

    def __init__(self, model: str, jobs: int) -> None:
        super().__init__(f"model '{model}' has {jobs} jobs running or queued on it; cancel them or wait")
        self.model = model
        self.param = "model"
