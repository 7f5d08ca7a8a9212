"""Forward passes of an HF causal LM with per-row steering: prefill one sequence, decode a batch."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.hf.kv_batch import KVBatch
from server.steering.hooks import BatchSteering, SteeringHooks
from server.steering.layers import find_decoder_layout
from server.steering.plan import SteeringPlan, prompt_position_mask, steers_generated_tokens


class ModelRunner:
    """Runs the model; owns the steering hooks. Not thread-safe: one scheduler thread drives it."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.layout = find_decoder_layout(model)
        self.hooks = SteeringHooks(self.layout)
        parameters = inspect.signature(model.forward).parameters
        self._takes_logits_to_keep = "logits_to_keep" in parameters
        self._takes_position_ids = "position_ids" in parameters
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        steering: BatchSteering | None,
    ) -> torch.Tensor:
        kwargs: dict[str, object] = {
            "attention_mask": attention_mask,
            "past_key_values": cache,
            "use_cache": True,
        }
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode(), self.hooks.active(steering):
            logits = self.model(input_ids=input_ids, **kwargs).logits
        return logits[:, -1, :].float()

    def prefill(
        self, prompt_ids: Sequence[int], plan: SteeringPlan | None
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Run a prompt alone; return the next-token logits [vocab] and its cache (batch dimension 1)."""
        length = len(prompt_ids)
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        steering = None
        if plan is not None:
            mask = prompt_position_mask(plan.positions, length).unsqueeze(0)
            steering = BatchSteering.build([plan], mask, dtype=self.dtype, device=self.device)
        cache = DynamicCache()
        logits = self._forward(
            input_ids,
            torch.ones((1, length), dtype=torch.long, device=self.device),
            torch.arange(length, device=self.device).unsqueeze(0),
            cache,
            steering,
        )
        return logits[0], cache

    def _block_outputs(
        self, token_ids: Sequence[int], reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> list[torch.Tensor]:
        """``reduce([positions, hidden])`` of every decoder block's output, in block order, unsteered."""
        captured: list[torch.Tensor] = []

        def capture(_module: torch.nn.Module, _args: object, output: object) -> None:
            hidden = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
            captured.append(reduce(hidden[0].float()).cpu())

        handles = [block.register_forward_hook(capture) for block in self.layout.blocks]
        try:
            with torch.inference_mode(), self.hooks.active(None):
                self.model(input_ids=torch.tensor([list(token_ids)], device=self.device))
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def block_output_means(self, token_ids: Sequence[int], start: int) -> torch.Tensor:
        """Mean over positions ``start:`` of every decoder block's output, unsteered: [num_layers, hidden]."""
        return torch.stack(self._block_outputs(token_ids, lambda hidden: hidden[start:].mean(dim=0)))

    def block_outputs_last_and_mean(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Each decoder block's output at the last position and the mean: [2, num_layers, hidden]."""
        outputs = self._block_outputs(token_ids, lambda hidden: torch.stack([hidden[-1], hidden.mean(dim=0)]))
        return torch.stack(outputs, dim=1)

    def response_nll(self, token_ids: Sequence[int], start: int) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of tokens ``start:`` given what precedes, unsteered."""
        ids = torch.tensor([list(token_ids)], device=self.device)
        with torch.inference_mode(), self.hooks.active(None):
            logits = self.model(input_ids=ids).logits[0, start - 1 : -1].float()
        targets = ids[0, start:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        return float(nll), int(targets.numel())

    def decode_steering(self, plans: Sequence[SteeringPlan | None]) -> BatchSteering | None:
        """The steering of a decode step for rows carrying ``plans`` (reusable while the rows stay)."""
        mask = torch.tensor(
            [[plan is not None and steers_generated_tokens(plan.positions)] for plan in plans],
            dtype=torch.bool,
        )
        return BatchSteering.build(plans, mask, dtype=self.dtype, device=self.device)

    def decode(
        self, batch: KVBatch, last_tokens: Sequence[int], steering: BatchSteering | None
    ) -> torch.Tensor:
        """Feed one token per row; return next-token logits [rows, vocab]."""
        assert batch.cache is not None
        attention_mask, position_ids = batch.begin_step()
        input_ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device).unsqueeze(1)
        return self._forward(input_ids, attention_mask, position_ids, batch.cache, steering)
