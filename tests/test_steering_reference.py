"""Steered forward passes against a hand computation of "add strength * v to block L's output"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from server.engine.hf.kv_batch import KVBatch
from server.engine.hf.runner import ModelRunner
from server.steering.plan import Positions, SteeringPlan
from testkit.tiny_models import SUPPORTED_ARCHITECTURES

PROMPT = [5, 17, 42, 9, 100, 23, 7]
LAYER = 1
STRENGTH = 2.5


class AddToOutput(nn.Module):
    """Stands in for a decoder block: runs it, then adds a fixed [tokens, hidden] tensor to its output."""

    def __init__(self, block: nn.Module, addition: torch.Tensor) -> None:
        super().__init__()
        self.block = block
        self.addition = addition

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out + self.addition
        return (out[0] + self.addition, *out[1:])

    def __getattr__(self, name: str) -> Any:  # models read attributes such as attention_type off blocks
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


def reference_logits(model: nn.Module, tokens: list[int], addition: torch.Tensor) -> torch.Tensor:
    runner_blocks = ModelRunner(model).layout.blocks
    original = runner_blocks[LAYER]
    runner_blocks[LAYER] = AddToOutput(original, addition)
    try:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0]
    finally:
        runner_blocks[LAYER] = original


def steered_positions(positions: Positions, prompt_length: int, total: int) -> torch.Tensor:
    mask = torch.zeros(total)
    if positions is Positions.ALL:
        mask[:] = 1
    elif positions is Positions.PROMPT:
        mask[:prompt_length] = 1
    else:  # the last prompt token and every generated token
        mask[prompt_length - 1 :] = 1
    return mask


def prefill_alone(
    runner: ModelRunner, prompt: list[int], plan: SteeringPlan | None
) -> tuple[torch.Tensor, KVBatch]:
    """Prefill one prompt; its logits [vocab] and a batch holding it."""
    logits, cache, mask = runner.prefill([prompt], [plan])
    batch = KVBatch()
    batch.append(cache, mask)
    return logits[0], batch


# A longer prompt prefilled in the same group, so the checked row is left-padded, with its own steering.
NEIGHBOUR = [5, 9, 14, 3, 8, 21, 2, 13, 6, 10, 4, 16]


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "padded-in-group"])
@pytest.mark.parametrize("positions", list(Positions))
@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_steered_logits_match_hand_computation(
    architecture: str, positions: Positions, grouped: bool, tiny_model_dir: Callable[[str], Path]
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(architecture)).eval()
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    plan = SteeringPlan({LAYER: vector}, strength=STRENGTH, positions=positions)
    runner = ModelRunner(model)

    # Engine: prefill the prompt (alone, or left-padded beside a longer one), then decode two tokens.
    if grouped:
        neighbour = SteeringPlan({LAYER: -vector}, strength=2.0)
        group_logits, cache, mask = runner.prefill([PROMPT, NEIGHBOUR], [plan, neighbour])
        batch = KVBatch()
        batch.append(cache, mask)
        logits, plans, fed = group_logits[0], [plan, neighbour], [0]
    else:
        logits, batch = prefill_alone(runner, PROMPT, plan)
        plans, fed = [plan], []
    steering = runner.decode_steering(plans)
    generated, engine_logits = [int(logits.argmax())], [logits]
    for _ in range(2):
        step_logits = runner.decode(batch, [generated[-1], *fed], steering)[0]
        engine_logits.append(step_logits)
        generated.append(int(step_logits.argmax()))
    runner.hooks.remove()

    # Hand computation: the whole sequence at once, no cache, the addition written out per position.
    tokens = PROMPT + generated[:-1]
    mask = steered_positions(positions, len(PROMPT), len(tokens))
    addition = mask[:, None] * (STRENGTH * vector)[None, :]
    expected = reference_logits(model, tokens, addition)[len(PROMPT) - 1 :]
    unsteered = reference_logits(model, tokens, torch.zeros_like(addition))[len(PROMPT) - 1 :]

    got = torch.stack(engine_logits)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - unsteered).abs().max().item() > 1e-3  # the steering did change something


def test_strength_zero_and_no_plan_are_bit_exact(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    runner = ModelRunner(model)
    vector = torch.randn(64)
    plain, _ = prefill_alone(runner, PROMPT, None)
    zero, _ = prefill_alone(runner, PROMPT, SteeringPlan({0: vector, 2: vector}, strength=0.0))
    assert torch.equal(plain, zero)
    steered, _ = prefill_alone(runner, PROMPT, SteeringPlan({0: vector}, strength=1.0))
    assert not torch.equal(plain, steered)


def test_unsteered_rows_are_untouched_in_a_steered_batch(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    runner = ModelRunner(model)
    plan = SteeringPlan({0: torch.randn(64), 2: torch.randn(64)}, strength=3.0)
    prompts = [PROMPT, [11, 12, 13], PROMPT[:4]]

    def decode_once(plans: list[SteeringPlan | None]) -> torch.Tensor:
        batch = KVBatch()
        for prompt, row_plan in zip(prompts, plans, strict=True):
            _, cache, mask = runner.prefill([prompt], [row_plan])
            batch.append(cache, mask)
        return runner.decode(batch, [3, 4, 5], runner.decode_steering(plans))

    baseline = decode_once([None, None, None])
    mixed = decode_once([None, plan, None])
    assert torch.equal(mixed[0], baseline[0])
    assert torch.equal(mixed[2], baseline[2])
    assert not torch.equal(mixed[1], baseline[1])
