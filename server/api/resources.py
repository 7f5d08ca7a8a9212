"""Response bodies of the resources the API serves itself: models, personas, jobs, mappings, health.

The completion objects live in ``server.serving.responses`` (the serving layer builds them) and the
error object in ``server.api.errors``. Routes declare these models as their ``response_model``, so
FastAPI checks every answer against its documented shape. Field order is the wire's key order.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.steering.plan import Positions


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "persona-server"
    backend: str = Field(description="The engine serving the model, e.g. hf or llamacpp.")
    num_layers: int = Field(description="Decoder blocks: a persona's layers are indices below this.")
    hidden_size: int = Field(description="The length of every persona vector for this model.")
    max_model_len: int = Field(description="The context window, in tokens.")
    parent: str | None = Field(None, description="The model this one was made from (a baked persona's base).")


class ModelDeleted(BaseModel):
    """A deleted model, as OpenAI answers the deletion of a fine-tuned model."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PersonaSummary(BaseModel):
    """A stored persona as any client sees it (GET /v1/personas)."""

    name: str
    model: str
    layers: list[int] = Field(description="The decoder blocks the persona holds a vector for.")
    hidden_size: int
    default_strength: float
    default_positions: Positions = Field(description="Where the persona steers unless a request says.")
    description: str
    provenance: dict[str, Any] = Field(description="How it was made: uploaded, imported, extracted, mapped.")
    version: int = Field(description="Grows by one on every write; send it as If-Match to update safely.")
    created_at: float = Field(description="Unix time of this version.")


class Persona(PersonaSummary):
    """A stored persona as the admin API shows it."""

    checksum: str = Field(description="sha256 over the vectors, in layer order.")


class PersonaWithVectors(Persona):
    """A stored persona with its vectors (GET /admin/personas/{name})."""

    layers: dict[str, list[float]] = Field(  # type: ignore[assignment]
        description="Decoder block -> vector of the model's hidden size."
    )


class PersonaSummaryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PersonaSummary]


class PersonaList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Persona]


class JobHandle(BaseModel):
    """A started background job: poll status_url."""

    id: str
    status_url: str


class JobStatus(BaseModel):
    id: str
    kind: str = Field(description="extraction, mapping or bake.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    queue_position: int | None = Field(
        ge=1,
        description="While queued: 1 for the next job to start (when its models have a free place), "
        "2 for the one after; null once it runs.",
    )
    progress: float = Field(ge=0, le=1)
    error: str | None = Field(description="Why the job failed (null unless it did).")
    result: dict[str, Any] | None = Field(
        description="On success: the stored persona and extraction summary, or the fitted mapping ids."
    )
    created_at: float


class Mapping(BaseModel):
    """A stored map from one model's residual stream to another's (without its matrices)."""

    id: str
    source_model: str
    target_model: str
    layers: dict[str, int] = Field(description="Source block -> target block.")
    source_hidden_size: int
    target_hidden_size: int
    metadata: dict[str, Any] = Field(description="Method, cross-validation diagnostics, calibration norms.")
    created_at: float
    checksum: str


class MappingSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    source_model: str
    target_model: str
    method: str | None = Field(description="ridge or procrustes.")
    layers: dict[str, int] = Field(description="Source block -> target block.")
    lambda_: dict[str, float | None] = Field(alias="lambda", description="Chosen ridge penalty per block.")
    r2: dict[str, float | None] = Field(description="Held-out R^2 per block.")
    created_at: float


class MappingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MappingSummary]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    engines_down: dict[str, str] = Field(
        default_factory=dict, description="Models whose engine cannot serve now (it died), and why."
    )


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    models: list[str]
    store: str = Field(description="ok, or why the persona store cannot be reached.")
    change_feed: str = Field(description="live, down (resubscribing) or none.")
    engines_down: dict[str, str] = Field(
        default_factory=dict,
        description="Models whose engine cannot serve now (it died and is restarting), and why.",
    )
