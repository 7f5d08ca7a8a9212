"""The in-graph steering of the vLLM engine without an engine: what the worker writes into the
persistent buffers before a forward, what the traced block step adds and reads with them, the slot
table and the front end's slot gate (docs/design.md, "Steering inside vLLM's compiled graph")."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from server.engine.vllm.capture import WorkerCaptures
from server.engine.vllm.in_graph import SteeringBuffers
from server.engine.vllm.slot_gate import SlotGate
from server.engine.vllm.slots import SlotTable
from server.engine.vllm.wire import CaptureSpec, SteeringRef, pack, unpack
from server.engine.vllm.worker_steering import BatchRow, WorkerSteering

HIDDEN = 4
BLOCKS = 3


def vector(seed: int) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


class Worker:
    """A worker's steering over buffers, and forwards run through the blocks' traced step."""

    def __init__(self, slots: int = 4) -> None:
        self.buffers = SteeringBuffers(BLOCKS, HIDDEN, slots, max_tokens=32, read_rows=8, dtype=torch.float32)
        self.buffers.owned_layers = tuple(range(BLOCKS))
        self.rows: list[BatchRow] = []
        self.steering = WorkerSteering(self.buffers, range(BLOCKS), lambda: self.rows, WorkerCaptures())
        for key, seed in (("a", 1), ("b", 2), ("c", 3)):
            self.steering.load(key, {1: pack(vector(seed).numpy()), 2: pack(vector(seed + 10).numpy())})

    def forward(self, rows: list[BatchRow], padded: int | None = None) -> list[torch.Tensor]:
        """Each block's addition at every token of the flat batch (the stream starts at zeros; each
        block's own output is the token's index, so reads can be told apart)."""
        self.rows = rows
        count = padded or (rows[-1].end if rows else 0)
        reads = self.steering.before_forward()
        # vLLM's blocks return (hidden, residual); the next block adds them into its residual.
        residual = torch.zeros(count, HIDDEN)
        previous = torch.zeros(count, HIDDEN)
        added = []
        for block in range(BLOCKS):
            residual = residual + previous
            hidden = torch.arange(count, dtype=torch.float32)[:, None].expand(count, HIDDEN) * (block + 1)
            previous, residual = self.buffers.step(block, (hidden.clone(), residual))
            added.append(previous - hidden)
        self.steering.after_forward(reads)
        return added


def row(start: int, end: int, prompt: int, computed: int, ref: SteeringRef | None = None, **kw) -> BatchRow:
    return BatchRow(start, end, prompt, computed, ref, **kw)


def test_each_token_adds_its_requests_plan_at_its_positions_and_unsteered_tokens_add_zeros() -> None:
    worker = Worker()
    one = SteeringRef((("a", 2.5),))
    composed = SteeringRef((("b", 1.5), ("c", -0.5)), "response")
    prompt_only = SteeringRef((("a", -1.0),), "prompt")
    rows = [
        row(0, 3, 3, 0, one),  # a prompt of 3, prefilled
        row(3, 4, 5, 0),  # unsteered
        row(4, 6, 4, 2, composed),  # the last 2 prompt tokens: only the last one is steered
        row(6, 7, 4, 4, composed),  # a generated token fed back
        row(7, 9, 6, 4, prompt_only),  # positions 4 and 5 of a 6-token prompt
        row(9, 10, 6, 6, prompt_only),  # generated: not steered
    ]
    added = worker.forward(rows)
    expected = torch.zeros(BLOCKS, 10, HIDDEN)
    for block in (1, 2):
        seed = 1 if block == 1 else 11
        a, b, c = vector(seed), vector(seed + 1), vector(seed + 2)
        expected[block, 0:3] = 2.5 * a
        expected[block, 5] = expected[block, 6] = 1.5 * b - 0.5 * c
        expected[block, 7:9] = -1.0 * a
    torch.testing.assert_close(torch.stack(added), expected)
    assert worker.steering.missing_sets == 0 and worker.steering.unslotted == 0


def test_a_batch_after_a_steered_one_adds_nothing_past_its_own_tokens() -> None:
    """CUDA graphs pad a batch: padding tokens must read slot 0 and the discard row, whatever the
    forward before wrote there."""
    worker = Worker()
    worker.forward([row(0, 8, 8, 0, SteeringRef((("a", 3.0),)))])
    added = worker.forward([row(0, 2, 4, 2)], padded=8)
    assert all(bool((block == 0).all()) for block in added)
    assert int(worker.buffers.token_slot.count_nonzero()) == 0


def test_more_plans_in_a_forward_than_slots_leave_the_extra_ones_out_and_say_so() -> None:
    worker = Worker(slots=1)
    refs = [SteeringRef((("a", 1.0),)), SteeringRef((("b", 1.0),))]
    worker.forward([row(0, 1, 1, 0, refs[0]), row(1, 2, 1, 0, refs[1])])
    assert worker.steering.unslotted == 1
    added = worker.forward([row(0, 1, 1, 0, refs[1])])  # the next forward gets the slot
    torch.testing.assert_close(added[1][0], vector(2))


def test_one_persona_at_any_strength_shares_a_slot() -> None:
    worker = Worker(slots=4)
    rows = [row(i, i + 1, 1, 0, SteeringRef((("a", float(i + 1)),))) for i in range(6)]
    added = worker.forward(rows)  # six strengths of one persona in four slots
    for i in range(6):
        torch.testing.assert_close(added[1][i], (i + 1) * vector(1))
    assert worker.steering.unslotted == 0


def test_read_backs_sum_their_positions_and_keep_the_last_prompt_token() -> None:
    worker = Worker()
    spec = CaptureSpec("read", start=1, num_blocks=2)
    steered = SteeringRef((("a", 2.0),))
    # A 5-token read-back prefilled in two chunks, beside a steered request.
    worker.forward([row(0, 2, 7, 0, steered), row(2, 5, 5, 0, capture=spec)])
    worker.forward([row(0, 2, 5, 3, capture=spec), row(2, 3, 7, 7, steered)])
    taken = worker.steering.captures.take("read")
    assert taken is not None and taken["counts"] == {0: 4, 1: 4}
    # Block l outputs (index * (l + 1)) summed into the stream: tokens 3, 4 then 0, 1 of the batch.
    stream_0 = (3 + 4 + 0 + 1) * 1.0
    stream_1 = stream_0 + (3 + 4 + 0 + 1) * 2.0
    assert unpack(taken["sums"][0], np.float64).tolist() == [stream_0] * HIDDEN
    assert unpack(taken["sums"][1], np.float64).tolist() == [stream_1] * HIDDEN
    assert unpack(taken["last"][1], np.float32).tolist() == [1 * 1 + 1 * 2.0] * HIDDEN  # batch token 1
    assert float(worker.buffers.reads[:, 1:].abs().sum()) == 0.0  # taken out and cleared


def test_the_slot_table_keeps_plans_in_use_and_gives_up_the_oldest_idle_one() -> None:
    table = SlotTable(2)
    assert table.assign(["p", "q"]) == {"p": (1, True), "q": (2, True)}
    assert table.assign(["q"]) == {"q": (2, False)}
    assert table.assign(["q", "r"]) == {"q": (2, False), "r": (1, True)}  # p was idle the longest
    assert table.assign(["q", "r", "s"]) == {"q": (2, False), "r": (1, False)}  # s finds none
    table.forget("r")
    assert table.assign(["s"]) == {"s": (1, True)}


async def test_the_slot_gate_lets_requests_with_more_plans_than_slots_wait_their_turn() -> None:
    gate = SlotGate(4)
    running: set[str] = set()
    most = 0

    async def request(key: str) -> None:
        nonlocal most
        async with gate.admit({key: 1}):
            running.add(key)
            most = max(most, len({k for k in running if k != "shared"}))
            await asyncio.sleep(0.01)
            running.discard(key)

    await asyncio.gather(*(request(f"p{i}") for i in range(10)))
    assert most == 4 and gate.taken == 0
    async with gate.admit({"p0": 1, "p1": 1, "p2": 1, "p3": 1}):
        # A plan already in flight is shared; a new one waits.
        async with gate.admit({"p1": 1}):
            assert gate.taken == 4
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), gate.admit({"p9": 1}):
                pass
    with pytest.raises(ValueError):
        SlotGate(3)
