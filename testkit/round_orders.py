"""The order in which a benchmark's conditions run, round by round."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def round_orders(conditions: Sequence[T], rounds: int, seed: int = 0) -> list[list[T]]:
    """Every condition once per round, in a seeded shuffle of its own each round.

    A rotation (round r starting at condition r) keeps each condition right after the same one in every
    round, so whatever a condition leaves behind (a peer server still busy after its last answer, a
    cache warmed for another model) always lands on the same neighbour and reads as that neighbour's
    cost. A shuffle spreads it over all of them.
    """
    generator = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(conditions)
        generator.shuffle(order)
        orders.append(order)
    return orders
