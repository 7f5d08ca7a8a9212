"""A batch of sequences decoding together over one left-padded KV cache.

Sequences are prefilled in groups and then merged into the batch, so a request can join while others
are decoding (continuous batching). Rows are aligned on the right: a shorter row is padded on the
left, and the attention mask hides the padding. Position ids are per row, so padding never shifts
a sequence's positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _left_pad(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    # F.pad lists pads from the last dimension backwards: (left, right) per dimension.
    pads = [0, 0] * (tensor.ndim - 1 - dim) + [amount, 0]
    return F.pad(tensor, pads)


class KVBatch:
    """The shared KV cache, attention mask and next position of every row of a decoding batch."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long)
        self.next_positions = torch.zeros(0, dtype=torch.long)

    @property
    def size(self) -> int:
        return int(self.next_positions.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def append(self, cache: DynamicCache, attention_mask: torch.Tensor) -> None:
        """Add the rows of a prefilled group (its cache and left-padded mask [rows, tokens]) at the end."""
        lengths = attention_mask.sum(dim=1)
        if self.cache is None or self.size == 0:
            self.cache, self.attention_mask, self.next_positions = cache, attention_mask, lengths
            return
        num_tokens = int(attention_mask.shape[1])
        pad_batch = max(0, num_tokens - self.length)
        pad_new = max(0, self.length - num_tokens)
        for batch_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            batch_layer.keys = torch.cat(
                [_left_pad(batch_layer.keys, pad_batch, 2), _left_pad(new_layer.keys, pad_new, 2)]
            )
            batch_layer.values = torch.cat(
                [_left_pad(batch_layer.values, pad_batch, 2), _left_pad(new_layer.values, pad_new, 2)]
            )
        self.attention_mask = torch.cat(
            [_left_pad(self.attention_mask, pad_batch, 1), _left_pad(attention_mask, pad_new, 1)]
        )
        self.next_positions = torch.cat([self.next_positions, lengths])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), then drop padding columns no remaining row needs."""
        if not rows:
            self.__init__()  # type: ignore[misc]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.next_positions.device)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        assert self.cache is not None
        # Shortest row first: every column before the longest row's start is padding for all rows.
        unused = self.length - int(self.attention_mask.sum(dim=1).max())
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, unused:]
            layer.values = layer.values.index_select(0, index)[:, :, unused:]
        self.attention_mask = self.attention_mask[:, unused:]

    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask and position ids for decoding one new token per row."""
        ones = torch.ones((self.size, 1), dtype=torch.long, device=self.attention_mask.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        position_ids = self.next_positions.unsqueeze(1)
        self.next_positions = self.next_positions + 1
        return self.attention_mask, position_ids
