"""Building transformers models one at a time in the process.

transformers builds a model (``from_pretrained``, ``from_config``) inside context managers that patch
process-wide state, not the calling thread's: ``PreTrainedModel.tie_weights`` becomes a no-op
(``transformers.initialization.no_tie_weights``), ``torch.linspace`` is wrapped
(``meta_device_safe_creation_ops``) and torch's default dtype is set (``local_torch_dtype``). Each
saves what it finds on entry and puts it back on exit, so two builds on two threads interleave: the
later one saves the earlier one's no-op as "the original" and restores it for good. From then on no
build ties its embeddings, a tied model's ``lm_head`` stays on the meta device, and every ``.to()``
or save of it fails with "Cannot copy out of meta tensor" until the process restarts (issue 29: six
bakes posted at once). Bakes, baked models, engines and the GGUF converter build models in worker
threads, so every build in the product goes through this module's one lock.

peft's ``get_peft_model`` and ``merge_and_unload`` and every ``save_pretrained`` patch nothing
global (peft does only under ``low_cpu_mem_usage``, which we never ask for): they need no lock.
"""

from __future__ import annotations

from pathlib import Path
from threading import Lock
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Process-wide on purpose: what it guards (transformers' patches of classes and of torch) is
# process-wide too, shared by every app and thread in the process.
_BUILDING = Lock()


def load_causal_lm(source: str | Path, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(source, **kwargs)``, never beside another build; with
    the attention the model's config needs unless the caller names one."""
    if "attn_implementation" not in kwargs:
        config = AutoConfig.from_pretrained(str(source), revision=kwargs.get("revision"))
        kwargs |= _attention_for(config)
    with _BUILDING:
        return AutoModelForCausalLM.from_pretrained(str(source), **kwargs)


def _attention_for(config: PretrainedConfig) -> dict[str, str]:
    """Eager attention for a model that caps its attention logits (Gemma 2): transformers' default,
    sdpa, skips the cap without a word, and answers as another model would."""
    text_config = getattr(config, "text_config", None) or config
    if getattr(text_config, "attn_logit_softcapping", None):
        return {"attn_implementation": "eager"}
    return {}


def causal_lm_from_config(config: PretrainedConfig, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config(config, **kwargs)`` (random weights), never beside another
    build."""
    with _BUILDING:
        return AutoModelForCausalLM.from_config(config, **kwargs)
