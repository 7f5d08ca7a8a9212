"""vLLM's engine arguments as persona-server sets them, and the process settings vLLM reads.

Two arguments are ours, not the user's: eager mode (vLLM skips Python hooks in a compiled model,
silently) and the worker extension that holds the hooks. The V1 model runner is pinned for the same
reason: the hooks read its batch layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.engine.base import EngineError

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "server.engine.vllm.worker_extension.PersonaWorkerExtension"
# Engine arguments persona-server must set itself; a user's value would switch the hooks off.
RESERVED_ARGS = {"enforce_eager": True, "worker_extension_cls": WORKER_EXTENSION}


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
    extra: Mapping[str, Any] = field(default_factory=dict)

    def engine_kwargs(self, source: str, model_id: str) -> dict[str, Any]:
        """Keyword arguments of vLLM's ``AsyncEngineArgs`` for one model."""
        clash = sorted(set(self.extra) & set(RESERVED_ARGS))
        if clash:
            raise EngineError(
                f"vLLM engine arguments {clash} are set by persona-server (steering needs them)"
            )
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
        return {**kwargs, **self.extra, **RESERVED_ARGS}

    def prepare_process(self) -> None:
        """Environment vLLM reads at start-up (inherited by its spawned processes); a value the user
        set wins, except the model-runner pin the hooks depend on."""
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
            logger.warning("VLLM_USE_V2_MODEL_RUNNER is overridden: persona steering hooks the V1 runner")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        # CPU builds of vLLM need a KV cache size (GiB) and a local address for their internal queues.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
