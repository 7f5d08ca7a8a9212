"""Forward passes of an HF causal LM with per-row steering: prefill a group of prompts, decode a batch."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.hf.kv_batch import KVBatch
from server.engine.hf.kv_cache import GrowingCache
from server.steering.hooks import BatchSteering, SteeringHooks, summed, with_edits
from server.steering.layers import find_decoder_layout
from server.steering.plan import Positions, SteeringPlan, prompt_position_mask, steers_generated_tokens


class _EnoughBlocks(Exception):
    """Raised from a block's hook to end a forward pass once every block needed has run."""


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
        # The KV cache of each prefilled group; transformers' own DynamicCache serves for comparisons.
        self.cache_factory: Callable[[], DynamicCache] = GrowingCache
        # Any id serves as padding (masked out); the model's own pad id keeps its embedding finite.
        self.pad_token_id = int(getattr(model.config, "pad_token_id", None) or 0)

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
        self,
        prompts: Sequence[Sequence[int]],
        plans: Sequence[SteeringPlan | None],
        extra: Sequence[Sequence[tuple[Mapping[int, torch.Tensor], Positions]]] | None = None,
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Run prompts together, left-padded to the longest; one weight pass serves the whole group.
        ``extra``: per row, more (block -> addition, positions) added besides its plan.

        Returns the next-token logits [rows, vocab], the group's cache and its attention mask
        [rows, longest] (0 on the padding), ready for ``KVBatch.append``.
        """
        input_ids, attention_mask, position_ids = self._left_padded(prompts)
        longest = int(input_ids.shape[1])
        pads = [longest - len(ids) for ids in prompts]
        steering = None
        if any(plan is not None for plan in plans):
            masks = torch.zeros((len(prompts), longest), dtype=torch.bool)
            for row, (plan, ids) in enumerate(zip(plans, prompts, strict=True)):
                if plan is not None:
                    masks[row, pads[row] :] = prompt_position_mask(plan.positions, len(ids))
            steering = BatchSteering.build(plans, masks, dtype=self.dtype, device=self.device)
        for row, parts in enumerate(extra or ()):
            for deltas, positions in parts:
                mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
                mask[row, pads[row] :] = prompt_position_mask(positions, len(prompts[row]))
                rows: list[Mapping[int, torch.Tensor] | None] = [None] * len(prompts)
                rows[row] = deltas
                part = BatchSteering.from_deltas(rows, mask, dtype=self.dtype, device=self.device)
                steering = summed([steering, part], len(prompts))
        cache = self.cache_factory()
        logits = self._forward(input_ids, attention_mask, position_ids, cache, steering)
        return logits, cache, attention_mask

    def _left_padded(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and position ids [rows, longest] of sequences padded on the left."""
        longest = max(len(ids) for ids in sequences)
        pads = [longest - len(ids) for ids in sequences]
        input_ids = torch.tensor(
            [[self.pad_token_id] * pad + list(ids) for pad, ids in zip(pads, sequences, strict=True)],
            dtype=torch.long,
        )
        attention_mask = torch.tensor(
            [[0] * pad + [1] * len(ids) for pad, ids in zip(pads, sequences, strict=True)], dtype=torch.long
        )
        # Positions count real tokens only, so padding never shifts a sequence's positions.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return input_ids.to(self.device), attention_mask.to(self.device), position_ids.to(self.device)

    def response_means(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], num_blocks: int
    ) -> torch.Tensor:
        """Mean output of blocks ``0..num_blocks-1`` over positions ``start:`` of each sequence,
        unsteered, in one padded forward that stops after the last block needed: [rows, num_blocks, hidden].
        """
        input_ids, attention_mask, position_ids = self._left_padded(sequences)
        longest = int(input_ids.shape[1])
        # Per row, the weights of a mean over its response positions (0 on the prompt and the padding).
        weights = torch.zeros((len(sequences), longest), dtype=torch.float32, device=self.device)
        for row, (ids, start) in enumerate(zip(sequences, starts, strict=True)):
            weights[row, longest - len(ids) + start :] = 1.0 / (len(ids) - start)
        means: list[torch.Tensor] = []

        def capture(_module: torch.nn.Module, _args: object, output: object) -> None:
            hidden = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
            means.append(torch.einsum("rt,rth->rh", weights, hidden.float()).cpu())
            if len(means) == num_blocks:
                raise _EnoughBlocks  # the later blocks and the LM head would be computed for nothing

        handles = [block.register_forward_hook(capture) for block in self.layout.blocks[:num_blocks]]
        kwargs: dict[str, object] = {"attention_mask": attention_mask, "use_cache": False}
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        try:
            with torch.inference_mode(), self.hooks.active(None):
                self.model(input_ids=input_ids, **kwargs)
        except _EnoughBlocks:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(means, dim=1)

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
        generating = [
            plan if plan is not None and steers_generated_tokens(plan.positions) else None for plan in plans
        ]
        return self.rows_steering([None if plan is None else plan.deltas for plan in generating], generating)

    def rows_steering(
        self,
        rows_deltas: Sequence[Mapping[int, torch.Tensor] | None],
        edited_by: Sequence[SteeringPlan | None] = (),
    ) -> BatchSteering | None:
        """The steering of a decode step where row i adds ``rows_deltas[i]`` (block -> vector), then
        applies the edits of ``edited_by[i]`` where given."""
        mask = torch.ones((len(rows_deltas), 1), dtype=torch.bool)
        added = BatchSteering.from_deltas(rows_deltas, mask, dtype=self.dtype, device=self.device)
        return with_edits(added, edited_by, mask, self.device)

    @contextmanager
    def _capturing(self, rows: Sequence[int], num_blocks: int) -> Iterator[list[torch.Tensor]]:
        """Collect, during the forward run inside, the outputs of blocks ``0..num_blocks-1`` of
        ``rows`` at the last position (what the steering hooks left there), one tensor per block."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        outputs: list[torch.Tensor] = []

        def capture(_module: torch.nn.Module, _args: object, output: object) -> None:
            hidden = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
            outputs.append(hidden.index_select(0, index)[:, -1].float().cpu())

        handles = [block.register_forward_hook(capture) for block in self.layout.blocks[:num_blocks]]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def prefill_capturing(
        self,
        prompts: Sequence[Sequence[int]],
        plans: Sequence[SteeringPlan | None],
        rows: Sequence[int],
        num_blocks: int,
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """``prefill``, also returning the outputs of blocks ``0..num_blocks-1`` for ``rows`` at their
        last prompt token: [len(rows), num_blocks, hidden]."""
        with self._capturing(rows, num_blocks) as outputs:
            logits, cache, mask = self.prefill(prompts, plans)
        return logits, cache, mask, torch.stack(outputs, dim=1)

    def decode_capturing(
        self,
        batch: KVBatch,
        last_tokens: Sequence[int],
        steering: BatchSteering | None,
        rows: Sequence[int],
        num_blocks: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode``, also returning the outputs of blocks ``0..num_blocks-1`` for ``rows`` at the fed
        position: [len(rows), num_blocks, hidden] (what the steering hooks left there)."""
        with self._capturing(rows, num_blocks) as outputs:
            logits = self.decode(batch, last_tokens, steering)
        return logits, torch.stack(outputs, dim=1)

    def decode(
        self, batch: KVBatch, last_tokens: Sequence[int], steering: BatchSteering | None
    ) -> torch.Tensor:
        """Feed one token per row; return next-token logits [rows, vocab]."""
        assert batch.cache is not None
        attention_mask, position_ids = batch.begin_step()
        input_ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device).unsqueeze(1)
        return self._forward(input_ids, attention_mask, position_ids, batch.cache, steering)
