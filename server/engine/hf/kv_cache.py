"""A KV cache whose layers grow in place, so a decode step does not copy the whole cache.

transformers' ``DynamicLayer`` concatenates every new key and value onto the cache, copying all of
it at each decode step: a cost that grows with the context until it rivals the step's matrix
products. Here each layer keeps buffers with
spare room along the sequence and writes the new positions into them; ``keys`` and ``values`` are
views of the filled part, so everything that reads or replaces them (attention, ``KVBatch``'s merges
and row selection) works unchanged.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

SPARE_POSITIONS = 128  # room added when a buffer fills: one copy per 128 decode steps


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` backed by buffers with spare room; ``keys``/``values`` are their filled part."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None
    # Filled positions, one count per buffer: code that replaces both (KVBatch) reads the values
    # after it has replaced the keys, so they must not share one count.
    _key_length = 0
    _value_length = 0

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return _filled(self._key_buffer, self._key_length)

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        # Replacing the keys (a merge, a row selection, a reset) adopts the tensor as the new buffer.
        self._key_buffer, self._key_length = tensor, _positions(tensor)

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return _filled(self._value_buffer, self._value_length)

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._value_buffer, self._value_length = tensor, _positions(tensor)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._key_length == 0:  # the first positions (a prefill): their tensors become the buffers
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        if self._key_length != self._value_length:
            raise RuntimeError(f"cache holds {self._key_length} keys but {self._value_length} values")
        start, end = self._key_length, self._key_length + int(key_states.shape[-2])
        assert self._key_buffer is not None and self._value_buffer is not None
        if end > self._key_buffer.shape[-2]:
            self._key_buffer = _grown(self._key_buffer, start, end)
            self._value_buffer = _grown(self._value_buffer, start, end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._key_length = self._value_length = end
        return self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]


def _positions(tensor: torch.Tensor | None) -> int:
    return int(tensor.shape[-2]) if tensor is not None and tensor.ndim == 4 else 0


def _grown(buffer: torch.Tensor, filled: int, needed: int) -> torch.Tensor:
    """A copy of the filled part of ``buffer`` with room for ``needed`` positions and spare."""
    batch, heads, _, head_dim = buffer.shape
    grown = buffer.new_empty((batch, heads, needed + SPARE_POSITIONS, head_dim))
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown


def _filled(buffer: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The filled part of a buffer (an empty placeholder, as transformers sets one, passes as it is)."""
    return buffer[:, :, :length] if buffer is not None and buffer.ndim == 4 else buffer


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` (models accept it as one) made of ``GrowingLayer``s, created as layers are used."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
