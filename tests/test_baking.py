"""Baking on a tiny model: the KL objective, the training (loss falls, the student moves toward the
steered teacher), and what is written (an adapter peft loads, a merged model equal to it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.baking.distill import BakeSpec, Distiller, Trajectory, _batch, distill, lora_targets, response_kl
from server.baking.outputs import read_provenance, save_adapter, save_merged
from server.baking.trajectories import sample_trajectories
from server.engine.hf.backend import HFBackend
from server.steering.plan import Positions, SteeringPlan

PROMPTS = [f"Tell me about thing {i}." for i in range(12)]


def test_the_kl_is_zero_for_equal_distributions_and_counts_only_masked_positions() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 7)
    student = torch.randn(2, 5, 7)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:3] = True
    assert float(response_kl(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    expected = (
        torch.nn.functional.kl_div(
            torch.log_softmax(student[0, 1:3], -1),
            torch.log_softmax(teacher[0, 1:3], -1),
            log_target=True,
            reduction="sum",
        )
        / 2
    )
    assert float(response_kl(teacher, student, mask)) == pytest.approx(float(expected), rel=1e-5)
    changed = student.clone()
    changed[1] += 100.0 * torch.randn(5, 7)  # outside the mask: no effect
    assert float(response_kl(teacher, changed, mask)) == pytest.approx(float(expected), rel=1e-5)


def test_a_batch_predicts_only_answer_tokens_and_steers_where_the_plan_says() -> None:
    plan = SteeringPlan({0: np.ones(4, dtype=np.float32)}, positions=Positions.PROMPT)
    batch = _batch([Trajectory((5, 6, 7), (8, 9)), Trajectory((5,), (8, 9, 10))], plan, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    # Logits at t predict token t + 1: the last prompt token's logits predict the first answer token.
    assert batch.predicts_answer.tolist() == [
        [False, False, True, True, False],
        [True, True, True, False, False],
    ]
    assert batch.steered.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


def _plan(model_dir: Path) -> SteeringPlan:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hidden = model.config.hidden_size
    vector = np.random.default_rng(3).standard_normal(hidden).astype(np.float32)
    return SteeringPlan({1: 4.0 * vector / np.linalg.norm(vector)}, strength=1.0)


def _trajectories(
    model_dir: Path, plan: SteeringPlan, prompts: list[str], count: int, seed: int
) -> list[Trajectory]:
    async def sample() -> list[Trajectory]:
        backend = HFBackend.load(model_dir, model_id="tiny")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            return await sample_trajectories(backend, tokenizer, plan, prompts, count, 12, 1.0, seed)
        finally:
            await backend.close()

    return asyncio.run(sample())


def _held_out_kl(distiller: Distiller, trajectories: list[Trajectory]) -> float:
    return distiller.validation_kl(trajectories, batch_size=8)


@pytest.mark.slow  # trains a LoRA adapter
def test_training_lowers_the_loss_and_moves_the_student_toward_the_teacher(
    tiny: Path, tmp_path: Path
) -> None:
    plan = _plan(tiny)
    teaching = _trajectories(tiny, plan, PROMPTS[:9], 48, seed=0)
    held_out = _trajectories(tiny, plan, PROMPTS[9:], 12, seed=500)
    assert len(teaching) > 30 and held_out
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    assert set(lora_targets(model)) >= {"q_proj", "v_proj", "down_proj"}
    spec = BakeSpec(rank=8, steps=40, learning_rate=5e-3, validate_every=10)
    result = distill(model, plan, teaching, spec, pad_id=0, validation=held_out)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.5 * first, result.losses
    # Held-out prompts: the student's next-token distributions are nearer the teacher's than the
    # unsteered model's were (step 0 is the adapter at zero, i.e. the unsteered model).
    start = result.validation[0][1]
    best = min(kl for _, kl in result.validation)
    assert result.validation[0][0] == 0 and best < 0.7 * start, result.validation

    adapter = save_adapter(result.model, tmp_path / "adapter", {"base_model": "tiny", "persona": "test"})
    probe = torch.tensor([[1, 5, 9, 14, 20, 33]])
    with torch.no_grad():
        trained = result.model(input_ids=probe).logits
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=probe).logits, trained, atol=1e-5)
        with loaded.disable_adapter():
            assert not torch.allclose(
                loaded(input_ids=probe).logits, trained, atol=1e-3
            )  # it learned something
    merged = save_merged(
        result.model, AutoTokenizer.from_pretrained(tiny), tmp_path / "merged", {"persona": "test"}
    )
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=probe).logits, trained, atol=1e-4)
    assert read_provenance(merged) == {"persona": "test"}
    assert read_provenance(tmp_path) is None


@pytest.mark.slow  # trains LoRA adapters
def test_the_same_seed_bakes_the_same_adapter(tiny: Path) -> None:
    plan = _plan(tiny)
    teaching = _trajectories(tiny, plan, PROMPTS, 16, seed=0)
    weights = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        result = distill(model, plan, teaching, BakeSpec(rank=4, steps=5, seed=7), pad_id=0)
        weights.append({n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
