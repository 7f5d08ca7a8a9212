"""Prometheus collectors of one server instance (a registry per app, so tests and apps never share)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ("model", "persona")
        self.request_latency = Histogram(
            "persona_server_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "persona_server_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "persona_server_queue_time_seconds",
            "Time from submission to the prefill.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "persona_server_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            labels,
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "persona_server_prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "persona_server_generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.requests = Counter(
            "persona_server_requests",
            "Finished requests by status (finish reason or error class).",
            (*labels, "status"),
            registry=self.registry,
        )
        self.persona_score = Histogram(
            "persona_server_persona_score",
            "Monitored persona scores (projection on the unit vector).",
            labels,
            buckets=(-50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50),
            registry=self.registry,
        )
        self._add_store_collectors()  # the exposition keeps this order
        self._add_admission_collectors()
        self._add_engine_collectors()

    def _add_admission_collectors(self) -> None:
        self.requests_running = Gauge(
            "persona_server_requests_running",
            "Requests generating tokens.",
            ("model",),
            registry=self.registry,
        )
        self.requests_refused = Counter(
            "persona_server_requests_refused",
            "Requests refused before any work: 413 (body over the "
            "cap) or 429 (every batch row and queue place of the model taken).",
            ("status",),
            registry=self.registry,
        )
        self.requests_waiting = Gauge(
            "persona_server_requests_waiting",
            "Requests admitted but without a first token yet.",
            ("model",),
            registry=self.registry,
        )

    def _add_store_collectors(self) -> None:
        self.store_latency = Histogram(
            "persona_server_store_latency_seconds",
            "Calls that reached the persona store.",
            ("operation",),
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "persona_server_store_errors",
            "Persona store calls that failed (store unreachable or broken).",
            ("operation",),
            registry=self.registry,
        )
        self.store_cache_lookups = Counter(
            "persona_server_store_cache_lookups",
            "Persona lookups: hit (served from memory) or miss.",
            ("result",),
            registry=self.registry,
        )

    def _add_engine_collectors(self) -> None:
        self.engine_deaths = Counter(
            "persona_server_engine_deaths",
            "Engines found dead (a process or thread died, or steps kept failing); the server restarts them.",
            ("model",),
            registry=self.registry,
        )
        self.engine_restarts = Counter(
            "persona_server_engine_restarts",
            "Dead engines loaded again and serving.",
            ("model",),
            registry=self.registry,
        )

    # The persona store's observer (persona_store.cache.StoreObserver), without importing it.
    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        self.store_latency.labels(operation).observe(seconds)
        # Touched on success too: the error series of every operation called exists from then on,
        # so a dashboard's rate of errors reads 0 rather than no data.
        errors = self.store_errors.labels(operation)
        if failed:
            errors.inc()

    def cache_lookup(self, hit: bool) -> None:
        self.store_cache_lookups.labels("hit" if hit else "miss").inc()
