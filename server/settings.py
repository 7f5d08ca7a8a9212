"""Every knob of the server: a default, an environment variable PERSONA_SERVER_<NAME> and a description.

The `persona-server serve` flags are derived from this class (``--served-model-name`` is
``PERSONA_SERVER_SERVED_MODEL_NAME``); lists are given by repeating a flag, or in the environment as
JSON (``PERSONA_SERVER_MODEL='["a", "b"]'``). Flags win over the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/persona-server, else ~/.local/share/persona-server."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "persona-server"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PERSONA_SERVER_",
        cli_kebab_case=True,
        cli_prog_name="persona-server serve",
        cli_implicit_flags=True,
        extra="ignore",
    )

    model: list[str] = Field(
        default_factory=list,
        description="Model to serve: a local directory or a hub id. Repeat for several. "
        "None: the bundled demo models, demo-llama, demo-qwen and demo-phi3, with their personas.",
    )
    served_model_name: list[str] = Field(
        default_factory=list,
        description="Name clients use for the i-th --model (default: its directory or file name).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    store: str | None = Field(
        None,
        description="Persona store: sqlite:///PATH or redis://HOST:PORT/DB "
        "(default: sqlite in <data-dir>/personas.sqlite3).",
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Where the embedded store lives.")
    admin_key: str | None = Field(
        None,
        description="Bearer key of the /admin routes (unset: only clients on this machine that come "
        "through no proxy: a loopback peer and no X-Forwarded-For, Forwarded or X-Real-IP header).",
    )
    api_key: str | None = Field(None, description="Bearer key of the /v1 routes (unset: open).")
    metrics_key: str | None = Field(
        None,
        description="Bearer key of /metrics (unset: open). The metrics name the personas clients "
        "ask for and the models served.",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port (on --host) instead of the API port, e.g. one that "
        "only Prometheus can reach. Unset: /metrics is on the API port.",
    )
    engine: str = Field(
        "auto",
        pattern="^(auto|hf|llama.cpp|vllm)$",
        description="Engine of every --model: auto (a .gguf file -> llama.cpp, else hf), hf, llama.cpp "
        "or vllm (vLLM's engine; pip install 'persona-server[vllm]'). Each model gets its own engine.",
    )
    dtype: str = Field(
        "float32", description="Weights dtype of HF and vLLM models: float32, bfloat16 or float16."
    )
    device: str = Field("cpu", description="Torch device of HF models, e.g. cpu or cuda:0.")
    max_num_seqs: int = Field(32, ge=1, description="Requests decoded together per model (batch rows).")
    gguf_contexts: int = Field(
        2,
        ge=1,
        le=64,
        description="GGUF models: control-vector contexts over the one loaded model. Each carries "
        "one steering plan at a time (free per token); requests with its plan batch together.",
    )
    gguf_mixed_context: bool = Field(
        True,
        description="GGUF models: one more context that batches requests with different personas, "
        "each token steered by its own vector through llama.cpp's evaluation callback.",
    )
    gguf_context_tokens: int = Field(
        8192,
        ge=64,
        description="GGUF models: KV cache cells per context, shared by its requests (memory grows "
        "with contexts x tokens).",
    )
    gguf_threads: int | None = Field(None, ge=1, description="GGUF models: CPU threads (default: all cores).")
    gguf_kv_type: str = Field("f16", pattern="^(f16|f32)$", description="GGUF models: KV cache type.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM models: GPUs each model is split across.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM models: pipeline stages of each model.")
    data_parallel_size: int = Field(1, ge=1, description="vLLM models: engine replicas of each model.")
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM models: context length (default: the model's own)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM models: share of GPU memory the engine may take."
    )
    quantization: str | None = Field(
        None, description="vLLM models: quantization method, e.g. awq, gptq, fp8 (default: the checkpoint's)."
    )
    enable_prefix_caching: bool = Field(
        True,
        description="vLLM models: reuse KV of shared prefixes (steered requests share only with "
        "requests steered alike).",
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM models: any other engine argument (a name of vLLM's AsyncEngineArgs), "
        """as JSON, e.g. --vllm-engine-args '{"block_size": 32, "kv_cache_dtype": "fp8"}'.""",
    )
    vllm_steering_slots: int | None = Field(
        None,
        ge=4,
        description="vLLM models: distinct steering plans each worker holds at once (default: "
        "--max-num-seqs); a request whose plan finds no free slot waits for one.",
    )
    vllm_cpu_kv_cache_gib: int = Field(
        1, ge=1, description="vLLM on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, when unset)."
    )
    max_queue: int = Field(
        256, ge=0, description="Requests per model that may wait for a batch row before 429 is answered."
    )
    max_jobs_per_kind: int = Field(
        2,
        ge=1,
        le=64,
        description="Admin jobs of one kind (bake, extraction, mapping fit, and map requests of the "
        "generated method) that run at once; more wait in the job queue.",
    )
    max_jobs_per_model: int = Field(
        1,
        ge=1,
        le=64,
        description="Admin jobs of any kind that run at once on one model (a map or fit works on two). "
        "Jobs share the model's engine with chat: one at a time keeps chat latency near its usual.",
    )
    max_queued_jobs: int = Field(
        16,
        ge=0,
        le=10_000,
        description="Admin jobs that may wait for a place (their status gives their queue_position); "
        "past them a job is answered 429 with Retry-After.",
    )
    engine_max_restarts: int = Field(
        5,
        ge=0,
        description="Restarts of a model's dead engine within 10 minutes; past them it stays "
        "down and /ready answers 503 naming it, for the orchestrator to replace the replica.",
    )
    engine_restart_delay: float = Field(
        1.0,
        gt=0,
        description="Seconds before the first try to restart a dead engine (doubled before "
        "each of up to 5 tries); meanwhile its requests answer 503 with Retry-After.",
    )
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that names none.")
    max_strength: float = Field(
        64.0,
        gt=0,
        description="Largest |strength| a request may apply at any block: of one persona, "
        "and of a composition's strengths added up (400 above).",
    )
    max_body_bytes: int | None = Field(
        None,
        ge=1024,
        description="Largest request body accepted (413 above). Default: room for the largest served "
        "context and vector upload (32 bytes a token or a vector value), and at least 8 MiB.",
    )
    mapping_corpus: Path | None = Field(
        None,
        description="Texts a mapping is fitted on when a fit names none: a .txt file (one text a line) "
        'or .jsonl (a string or {"text": ...} a line). Default: the shipped demo corpus of everyday '
        "sentences, made for the demo models; give a real model pair texts of its own domain.",
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")

    @model_validator(mode="after")
    def _names_match_models(self) -> Settings:
        if len(self.served_model_name) > len(self.model):
            raise ValueError("more --served-model-name than --model given")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("--metrics-port must differ from --port")
        return self

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.data_dir / 'personas.sqlite3'}"

    def model_ids(self) -> list[str]:
        names = list(self.served_model_name)
        for source in self.model[len(names) :]:
            names.append(Path(source.rstrip("/")).name)
        return names
