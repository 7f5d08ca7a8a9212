"""Distillation of a steered model (the teacher) into LoRA weights on the same model (the student).

The teacher is the base model with the persona's vectors added to its block outputs (our forward
hooks, exactly as the server steers); the student is the same model with a LoRA adapter and no
steering. Both read the teacher's own sampled answers; the loss is KL(teacher || student) over the
vocabulary at every answer token, averaged over answer tokens. The adapter starts at zero (peft
initialises B to 0), so the student starts as the unsteered model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from server.steering.hooks import BatchSteering, SteeringHooks
from server.steering.layers import find_decoder_layout
from server.steering.plan import SteeringPlan, steered_position_mask

# The projections of attention and MLP in the families transformers names this way (Llama, Qwen,
# Mistral, Gemma: split; Phi-3: fused qkv_proj and gate_up_proj).
PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
)


@dataclass(frozen=True)
class BakeSpec:
    rank: int = 32
    alpha: float | None = None  # LoRA scaling numerator (default: 2 * rank)
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 2e-3
    seed: int = 0
    # Every this many steps the KL on held-out prompts' answers is measured; the adapter kept is the
    # one with the lowest (on the demo models the training KL keeps falling long after the held-out
    # one has turned: the student learns the training prompts, not the persona).
    validate_every: int = 10

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha is None else self.alpha


@dataclass(frozen=True)
class Trajectory:
    """One sampled answer: the prompt's tokens and the answer's tokens, as the model read and wrote them."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


@dataclass
class DistillResult:
    model: PeftModel
    losses: list[float] = field(default_factory=list)  # KL per step (nats per answer token)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KL)
    best_step: int = 0
    targets: tuple[str, ...] = ()


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The attention and MLP projections this model has (peft matches them by name suffix)."""
    names = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    found = tuple(name for name in PROJECTIONS if name in names)
    if not found:
        raise ValueError("the model has none of the attention or MLP projections LoRA is put on")
    return found


def response_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student) over the vocabulary."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor  # [rows, tokens], right-padded
    attention_mask: torch.Tensor
    predicts_answer: torch.Tensor  # bool [rows, tokens]: logits at t predict an answer token t + 1
    steered: torch.Tensor  # bool [rows, tokens]: where the teacher's plan steers


def _batch(trajectories: Sequence[Trajectory], plan: SteeringPlan, pad_id: int) -> _Batch:
    length = max(len(t.prompt_ids) + len(t.response_ids) for t in trajectories)
    rows = len(trajectories)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, length), dtype=torch.long)
    predicts = torch.zeros((rows, length), dtype=torch.bool)
    steered = torch.zeros((rows, length), dtype=torch.bool)
    for row, trajectory in enumerate(trajectories):
        tokens = [*trajectory.prompt_ids, *trajectory.response_ids]
        prompt = len(trajectory.prompt_ids)
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        predicts[row, prompt - 1 : len(tokens) - 1] = True
        steered[row, : len(tokens)] = steered_position_mask(plan.positions, torch.arange(len(tokens)), prompt)
    return _Batch(input_ids, attention, predicts, steered)


class Distiller:
    """The student (base + LoRA) and its teacher (base, adapter off, steered), on one model copy."""

    def __init__(self, model: nn.Module, plan: SteeringPlan, spec: BakeSpec, pad_id: int) -> None:
        torch.manual_seed(spec.seed)
        # Hooks go on the decoder blocks before peft wraps the model: peft replaces Linear layers
        # inside the blocks, not the blocks, so the hooks stay where the server puts its own.
        self._hooks = SteeringHooks(find_decoder_layout(model))
        self.targets = lora_targets(model)
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.lora_alpha,
            target_modules=list(self.targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model: PeftModel = get_peft_model(model, config)
        self._plan = plan
        self._pad_id = pad_id
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self._optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=0.0)

    def teacher_logits(self, batch: _Batch) -> torch.Tensor:
        plans = [self._plan] * batch.input_ids.shape[0]
        param = next(self.model.parameters())
        steering = BatchSteering.build(plans, batch.steered, dtype=param.dtype, device=param.device)
        with torch.no_grad(), self.model.disable_adapter(), self._hooks.active(steering):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def loss(self, trajectories: Sequence[Trajectory]) -> torch.Tensor:
        batch = _batch(trajectories, self._plan, self._pad_id)
        teacher = self.teacher_logits(batch)
        student = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return response_kl(teacher, student, batch.predicts_answer)

    def step(self, trajectories: Sequence[Trajectory]) -> float:
        self.model.train()
        loss = self.loss(trajectories)
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer.step()
        return float(loss.detach())

    def validation_kl(self, trajectories: Sequence[Trajectory], batch_size: int) -> float:
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(trajectories), batch_size):
                chunk = trajectories[start : start + batch_size]
                total += float(self.loss(chunk)) * len(chunk)
                count += len(chunk)
        return total / max(count, 1)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                if name in state:
                    parameter.copy_(state[name])

    def close(self) -> None:
        self._hooks.remove()


def _batches(trajectories: Sequence[Trajectory], spec: BakeSpec) -> Iterator[list[Trajectory]]:
    """Batches of a seeded shuffle, epoch after epoch."""
    order = random.Random(spec.seed)
    pool: list[Trajectory] = []
    while True:
        if len(pool) < spec.batch_size:
            shuffled = list(trajectories)
            order.shuffle(shuffled)
            pool += shuffled
        batch, pool = pool[: spec.batch_size], pool[spec.batch_size :]
        yield batch


def distill(
    model: nn.Module,
    plan: SteeringPlan,
    trajectories: Sequence[Trajectory],
    spec: BakeSpec,
    pad_id: int,
    validation: Sequence[Trajectory] = (),
    progress: Callable[[float], None] | None = None,
) -> DistillResult:
    """Train a LoRA adapter on ``model`` (wrapped in place) for ``spec.steps`` steps of KL; with
    ``validation`` (answers to other prompts), keep the adapter of the step where their KL was lowest."""
    if not trajectories:
        raise ValueError("no trajectories to distil from")
    distiller = Distiller(model, plan, spec, pad_id)
    result = DistillResult(model=distiller.model, targets=distiller.targets)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    try:
        batches = _batches(trajectories, spec)
        for step in range(spec.steps + 1):
            if validation and (step % spec.validate_every == 0 or step == spec.steps):
                held_out = distiller.validation_kl(validation, spec.batch_size)
                result.validation.append((step, held_out))
                if best is None or held_out < best[0]:
                    best, result.best_step = (held_out, distiller.adapter_state()), step
            if step == spec.steps:
                break
            result.losses.append(distiller.step(next(batches)))
            if progress is not None:
                progress((step + 1) / spec.steps)
        if best is not None:
            distiller.load_adapter_state(best[1])
        else:
            result.best_step = spec.steps
    finally:
        distiller.close()
    distiller.model.eval()
    return result
