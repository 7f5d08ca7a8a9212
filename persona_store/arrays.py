"""Per-layer float32 arrays: what persona vectors and mapping matrices share.

Both are a dict of layer -> array of one shape; both are checked the same way when drafted and
identified by a sha256 over their bytes in layer order (the checksum a store keeps with them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def float32_by_layer(
    arrays: Mapping[Any, Any], ndim: int, empty: str, mismatch: str
) -> dict[int, np.ndarray]:
    """Contiguous float32 arrays by int layer, in layer order.

    Raises ValueError(``empty``) when there is none, ValueError(``mismatch``) unless all share one
    shape of ``ndim`` dimensions.
    """
    by_layer = {int(layer): np.ascontiguousarray(array, dtype=np.float32) for layer, array in arrays.items()}
    if not by_layer:
        raise ValueError(empty)
    shapes = {array.shape for array in by_layer.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != ndim:
        raise ValueError(mismatch)
    return dict(sorted(by_layer.items()))


def vectors_checksum(vectors: Mapping[int, np.ndarray]) -> str:
    """sha256 over the float32 bytes of the vectors in layer order, prefixed with their layers."""
    return _checksum(vectors, with_shapes=False)


def matrices_checksum(matrices: Mapping[int, np.ndarray]) -> str:
    """sha256 over each source block, its shape and its float32 bytes, in block order."""
    return _checksum(matrices, with_shapes=True)


def _checksum(arrays: Mapping[int, np.ndarray], with_shapes: bool) -> str:
    # Stored checksums depend on this exact byte sequence: a change here makes every stored one differ.
    digest = hashlib.sha256()
    for layer in sorted(arrays):
        array = np.ascontiguousarray(arrays[layer], dtype=np.float32)
        digest.update(int(layer).to_bytes(4, "little"))
        if with_shapes:
            digest.update(np.asarray(array.shape, dtype=np.int64).tobytes())
        digest.update(array.tobytes())
    return digest.hexdigest()
