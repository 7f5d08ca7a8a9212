"""Persona monitoring: how much of a persona's trait an answer shows.

As in the persona-vectors paper, the score is the projection of the answer's activations on the
unit persona vector: the mean over the response tokens of each persona block's output (read back
unsteered, so that it measures the text, whatever steered its writing), dotted with the unit vector,
averaged over the persona's blocks. Higher means more of the trait.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from persona_store.base import PersonaStore
from server.engine.base import ModelInfo
from server.serving.personas import lookup


@dataclass(frozen=True)
class Monitor:
    name: str
    directions: dict[int, np.ndarray]  # block -> unit persona vector


async def load_monitors(store: PersonaStore, model: ModelInfo, names: Sequence[str]) -> list[Monitor]:
    """The personas to monitor, as unit vectors (PersonaNotFound for an unknown name)."""
    monitors = []
    for name in dict.fromkeys(names):
        record = await lookup(store, model, name, "persona_monitor")
        inside = {block: vector for block, vector in record.vectors.items() if block < model.num_layers}
        monitors.append(unit_monitor(name, inside))
    return monitors


def unit_monitor(name: str, vectors: Mapping[int, np.ndarray]) -> Monitor:
    """The persona's blocks as unit vectors (a zero vector reads nothing and is left out)."""
    directions = {
        block: (vector / np.linalg.norm(vector)).astype(np.float32)
        for block, vector in vectors.items()
        if np.linalg.norm(vector) > 0
    }
    return Monitor(name, directions)


def monitored_blocks(monitors: Sequence[Monitor]) -> int:
    """How many leading blocks the scores need: one past the deepest monitored block (at least 1)."""
    return 1 + max((block for monitor in monitors for block in monitor.directions), default=0)


def persona_scores(response_means: np.ndarray, monitors: Sequence[Monitor]) -> dict[str, float]:
    """``response_means``: [blocks, hidden], the mean block outputs over the response tokens, covering
    every monitored block."""
    return {
        monitor.name: float(
            np.mean([response_means[block] @ unit for block, unit in monitor.directions.items()])
        )
        for monitor in monitors
        if monitor.directions
    }
