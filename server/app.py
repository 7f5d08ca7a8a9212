"""create_app(settings): the one composition root. The lifespan builds the store and the engines."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from persona_store.base import PersonaStore
from persona_store.cache import CachingStore
from persona_store.redis import RedisStore
from persona_store.sqlite import SQLiteStore
from server.admin.baked_models import PersonaBakes
from server.admin.extraction_jobs import PersonaExtraction
from server.admin.fitting_corpus import DEMO_CORPUS, FittingCorpus
from server.admin.job_admission import JobLimits
from server.admin.jobs import JobRegistry
from server.admin.mapping_fits import MappingFits
from server.admin.persona_admin import PersonaAdmin
from server.admin.persona_files import PersonaFiles
from server.admin.persona_mapping import PersonaMapper
from server.api.body_limit import MIN_BODY_BYTES, BodySizeLimit, default_body_bytes
from server.api.errors import AsciiJSONResponse, install_error_handlers
from server.api.metrics_port import MetricsServer
from server.api.openapi import install_openapi
from server.api.routes import admin, health, openai
from server.api.routes.playground import install_playground
from server.api.services import Services, services_of
from server.baking.outputs import read_provenance
from server.demo.models import DEMO_MODEL_NAMES, demo_model_dir, seed_demo_personas
from server.engine.base import Backend
from server.engine.registry import load_backend, load_backends
from server.metrics import Metrics
from server.serving.completions import CompletionService, Limits
from server.serving.engine_supervisor import EngineSupervisor, RestartPolicy
from server.serving.model_registry import ModelRegistry
from server.settings import Settings

logger = logging.getLogger("persona_server")


class ConfigurationError(ValueError):
    """The settings name something this server cannot open."""


def open_store(url: str) -> PersonaStore:
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore.from_url(url)
    raise ConfigurationError(f"unknown store URL {url!r}: use sqlite:///PATH or redis://HOST:PORT/DB")


def model_sources(settings: Settings) -> list[tuple[str, str]]:
    """(source, served id) of every model; with no --model, the bundled demo models."""
    if not settings.model:
        return [(str(demo_model_dir(name)), name) for name in DEMO_MODEL_NAMES]
    ids = settings.model_ids()
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"served model names must be unique, got {ids}; use --served-model-name")
    return list(zip(settings.model, ids, strict=True))


def _start_metrics_server(settings: Settings, metrics: Metrics) -> MetricsServer | None:
    """/metrics on its own port, when --metrics-port asks for it."""
    if settings.metrics_port is None:
        return None
    server = MetricsServer(settings.host, settings.metrics_port, metrics.registry, settings.metrics_key)
    logger.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    return server.start()


def _baked_parents(sources: list[tuple[str, str]]) -> dict[str, str]:
    """The base of each served model that is a baked persona (its folder says so)."""
    parents = {}
    for source, model_id in sources:
        provenance = read_provenance(source) if Path(source).is_dir() else None
        if provenance is not None and provenance.get("base_model"):
            parents[model_id] = str(provenance["base_model"])
    return parents


def _persona_bakes(
    settings: Settings,
    registry: ModelRegistry,
    store: PersonaStore,
    jobs: JobRegistry,
    sources: list[tuple[str, str]],
    prompts: tuple[str, ...],
) -> PersonaBakes:
    async def load(folder: Path, model_id: str) -> Backend:
        return await asyncio.to_thread(load_backend, folder, model_id, settings)

    return PersonaBakes(
        registry,
        store,
        jobs,
        sources={model_id: Path(source) for source, model_id in sources},
        data_dir=settings.data_dir,
        default_prompts=prompts,
        load=load,
        max_strength=settings.max_strength,
        # A bake's teacher answers take a quarter of its model's batch rows: chat finds the rest free.
        requests_in_flight=max(1, settings.max_num_seqs // 4),
    )


def _engine_supervisor(services: Services) -> EngineSupervisor:
    """Restarts a dead engine from the source its model was loaded from."""
    settings, registry, metrics = services.settings, services.registry, services.metrics

    async def reload(model_id: str) -> Backend:
        source = registry.source(model_id)
        if source is None:
            raise ConfigurationError(f"model {model_id} has no source to load it again from")
        return await asyncio.to_thread(load_backend, source, model_id, settings)

    policy = RestartPolicy(
        first_delay_seconds=settings.engine_restart_delay, max_restarts=settings.engine_max_restarts
    )
    on_death = lambda model: metrics.engine_deaths.labels(model).inc()  # noqa: E731
    on_restart = lambda model: metrics.engine_restarts.labels(model).inc()  # noqa: E731
    return EngineSupervisor(registry, reload, on_death, on_restart, policy)


async def _build_services(settings: Settings, metrics: Metrics) -> Services:
    """Open the store, load the models, and build every service on them."""
    store = CachingStore(open_store(settings.store_url), observer=metrics)
    store.start()
    sources = model_sources(settings)
    backends = await asyncio.to_thread(load_backends, sources, settings)
    registry = ModelRegistry(
        backends,
        settings.max_num_seqs + settings.max_queue,
        _baked_parents(sources),
        sources={model_id: source for source, model_id in sources},
    )
    largest = max(max(b.info.max_context, b.info.num_layers * b.info.hidden_size) for b in backends.values())
    limits = Limits(settings.max_tokens_cap, settings.default_max_tokens, settings.max_strength)
    persona_admin = PersonaAdmin(registry, store, settings.max_strength)
    jobs = JobRegistry(
        JobLimits(settings.max_jobs_per_kind, settings.max_jobs_per_model, settings.max_queued_jobs)
    )
    corpus = await asyncio.to_thread(FittingCorpus.load, settings.mapping_corpus or DEMO_CORPUS)
    return Services(
        settings=settings,
        metrics=metrics,
        store=store,
        registry=registry,
        completions=CompletionService(registry, store, metrics, limits),
        persona_admin=persona_admin,
        persona_files=PersonaFiles(registry, store, persona_admin),
        jobs=jobs,
        persona_extraction=PersonaExtraction(registry, persona_admin, jobs),
        mapping_fits=MappingFits(registry, store, jobs, corpus),
        persona_mapper=PersonaMapper(registry, store, persona_admin, corpus, jobs),
        persona_bakes=_persona_bakes(settings, registry, store, jobs, sources, corpus.texts),
        max_body_bytes=settings.max_body_bytes or default_body_bytes(largest),
    )


@asynccontextmanager
async def _lifespan(app: FastAPI, settings: Settings, metrics: Metrics) -> AsyncIterator[None]:
    services = await _build_services(settings, metrics)
    app.state.services = services
    logger.info("persona store: %s", settings.store_url)
    logger.info("playground on http://%s:%d/playground", settings.host, settings.port)
    if not settings.model:
        await seed_demo_personas(services.store, settings.data_dir)
    await services.persona_bakes.serve_saved()
    if not settings.admin_key:
        logger.warning("no admin key is configured: admin routes accept loopback clients only")
    metrics_server = _start_metrics_server(settings, metrics)
    supervisor = _engine_supervisor(services)
    supervisor.start()
    try:
        yield
    finally:
        await supervisor.close()
        if metrics_server is not None:
            metrics_server.stop()
        await services.jobs.close()
        await services.registry.close()
        await services.store.close()


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    app = FastAPI(
        title="persona-server",
        summary="OpenAI-compatible inference with per-request persona steering.",
        lifespan=lambda app: _lifespan(app, settings, metrics),
        default_response_class=AsciiJSONResponse,
    )
    install_error_handlers(app, metrics)
    install_openapi(app, settings)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    install_playground(app)

    def max_body_bytes() -> int:
        # The default cap depends on the models: the lifespan sets it once they are loaded.
        services = services_of(app)
        return services.max_body_bytes if services is not None else settings.max_body_bytes or MIN_BODY_BYTES

    refused = metrics.requests_refused.labels("413")
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, refused=refused.inc)
    return app
