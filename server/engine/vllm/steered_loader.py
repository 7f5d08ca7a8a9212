"""The model loader persona-server gives vLLM: the user's loader, then the steering buffers and block
hooks installed before vLLM first traces the model (in_graph.py).

vLLM compiles the model at its first forward (the warm-up in start-up), long before the front end
can reach the workers; its public ``register_model_loader`` is the one extension point that runs
in the worker between building the model and that first forward. The loader is registered when
this module is imported, which the worker does when it resolves our worker extension (before it
loads the model); the front end names it with ``load_format`` and passes the user's own load
format in ``model_loader_extra_config``, and the slot count in vLLM's ``additional_config``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import BaseModelLoader, get_model_loader, register_model_loader

from server.engine.vllm.in_graph import SteeringBuffers, decoder_blocks, install
from server.engine.vllm.options import CONFIG_KEY, LOAD_FORMAT


@register_model_loader(LOAD_FORMAT)
class SteeredModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        ours = dict(load_config.model_loader_extra_config or {}).get(CONFIG_KEY)
        if not isinstance(ours, dict):
            raise ValueError(f"load format {LOAD_FORMAT!r} needs model_loader_extra_config[{CONFIG_KEY!r}]")
        inner = dataclasses.replace(
            load_config, load_format=ours["load_format"], model_loader_extra_config=ours["extra"]
        )
        self._inner = get_model_loader(inner)

    def download_model(self, model_config: ModelConfig) -> None:
        self._inner.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        self._inner.load_weights(model, model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        model = self._inner.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        if model_config is not vllm_config.model_config:
            return model  # a speculative decoder's draft model: it proposes tokens, steering is the target's
        blocks = decoder_blocks(model)
        reference = next(model.parameters())
        dtype = reference.dtype if reference.is_floating_point() else model_config.dtype
        scheduler = vllm_config.scheduler_config
        compilation = vllm_config.compilation_config
        # Every forward's flat batch fits: the scheduler's token budget, or a padded CUDA-graph size.
        max_tokens = max(scheduler.max_num_batched_tokens, compilation.max_cudagraph_capture_size or 0)
        settings = (vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        with torch.device(reference.device):
            buffers = SteeringBuffers(
                num_blocks=len(blocks),
                hidden=int(model_config.get_hidden_size()),
                slots=int(settings.get("slots", scheduler.max_num_seqs)),
                max_tokens=max_tokens,
                # Two read rows a request may need in one forward (a read-back's sum and its last token).
                read_rows=2 * scheduler.max_num_seqs,
                dtype=dtype,
            )
        install(model, buffers)
        return model
