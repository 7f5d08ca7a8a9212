"""Benchmarks run their conditions in an order that puts no condition always after the same one."""

from __future__ import annotations

from testkit.round_orders import round_orders


def test_each_round_runs_every_condition_once_and_neighbours_change() -> None:
    conditions = [f"condition {i}" for i in range(12)]
    orders = round_orders(conditions, rounds=3)
    assert len(orders) == 3 and all(sorted(order) == sorted(conditions) for order in orders)
    assert round_orders(conditions, rounds=3) == orders  # seeded: a run can be repeated
    before = [{order[i]: order[i - 1] for i in range(1, len(order))} for order in orders]
    always_after_the_same = [c for c in conditions if len({b.get(c) for b in before}) == 1]
    assert not always_after_the_same
