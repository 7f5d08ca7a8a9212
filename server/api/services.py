"""The services the routes use, in one typed holder, and the FastAPI dependency that hands it over.

``server.app`` builds a ``Services`` in its lifespan, once the store is open and the models are
loaded, and keeps it as ``app.state.services``, the one attribute of the app's state. Before the
lifespan (an app built only for its /openapi.json) there is none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from persona_store.base import PersonaStore
from server.admin.baked_models import PersonaBakes
from server.admin.extraction_jobs import PersonaExtraction
from server.admin.jobs import JobRegistry
from server.admin.mapping_fits import MappingFits
from server.admin.persona_admin import PersonaAdmin
from server.admin.persona_files import PersonaFiles
from server.admin.persona_mapping import PersonaMapper
from server.metrics import Metrics
from server.serving.completions import CompletionService
from server.serving.model_registry import ModelRegistry
from server.settings import Settings


@dataclass(frozen=True)
class Services:
    """The server's settings, metrics, store, engines (the registry) and the services built on them."""

    settings: Settings
    metrics: Metrics
    store: PersonaStore
    registry: ModelRegistry
    completions: CompletionService
    persona_admin: PersonaAdmin
    persona_files: PersonaFiles
    jobs: JobRegistry
    persona_extraction: PersonaExtraction
    mapping_fits: MappingFits
    persona_mapper: PersonaMapper
    persona_bakes: PersonaBakes
    max_body_bytes: int  # the body cap: --max-body-bytes, else one that fits the largest model's needs


def services_of(app: FastAPI) -> Services | None:
    """The app's services, or None before its lifespan has built them."""
    return getattr(app.state, "services", None)


def get_services(request: Request) -> Services:
    """The dependency of every route that uses a service (requests arrive only after the lifespan)."""
    services: Services = request.app.state.services
    return services


# A route's parameter ``services: ServicesDep`` receives the app's services.
ServicesDep = Annotated[Services, Depends(get_services)]
