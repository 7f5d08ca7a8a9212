"""llama.cpp lanes below the scheduler: the per-row lane's compiled evaluation callback (what it adds
and reads at the rows it is given), and cache cells copied from one lane to another."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from server.engine import llamacpp
from server.engine.base import EngineError
from server.engine.llamacpp import row_callback
from server.engine.llamacpp.backend import LlamaCppBackend, _init_llama_cpp
from server.engine.llamacpp.lane import Lane, LaneConfig, TokenSlot

pytestmark = pytest.mark.llama_cpp  # about a second a test

HIDDEN, BLOCKS, PROMPT = 64, 3, 16  # the tiny Llama's


@pytest.fixture(scope="module")
def model(llama_gguf: Path) -> Iterator[Any]:
    _init_llama_cpp()
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(llama_gguf).encode(), params)
    yield model
    llama_cpp.llama_model_free(model)


def _lane(model: Any, context_tokens: int, per_row: bool) -> Lane:
    config = LaneConfig(context_tokens=context_tokens, sequences=2, threads=2, kv_type="f32")
    lane = Lane(model, config, HIDDEN, BLOCKS, per_row=per_row)
    lane.set_vocab_size(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
    return lane


@pytest.fixture(scope="module")
def lane(model: Any) -> Iterator[Lane]:
    lane = _lane(model, 256, per_row=True)
    yield lane
    lane.close()


def _prompt(every_row_logits: bool) -> list[TokenSlot]:
    return [TokenSlot(5 + p, p, 0, every_row_logits or p == PROMPT - 1) for p in range(PROMPT)]


def _read(
    lane: Lane, additions: dict[int, np.ndarray], every_row_logits: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The last prompt token's logits, and every block's output at the rows read (all, or the last)."""
    rows = list(range(PROMPT)) if every_row_logits else [PROMPT - 1]
    logits, read = lane.decode_reading(_prompt(every_row_logits), additions, rows, BLOCKS)
    lane.clear()
    return logits[-1], read


def test_the_last_block_is_added_to_and_read_at_the_rows_that_ask_for_logits(lane: Lane) -> None:
    """llama.cpp's last block keeps only the rows that ask for logits: the callback maps a row's
    additions and its reading through them, so one prompt token read alone equals its row read
    with every row kept."""
    generator = np.random.default_rng(0)
    additions = {block: generator.standard_normal((PROMPT, HIDDEN)).astype(np.float32) for block in (1, 2)}
    alone_logits, alone = _read(lane, additions, every_row_logits=False)
    every_logits, every = _read(lane, additions, every_row_logits=True)
    assert alone.shape == (1, BLOCKS, HIDDEN) and every.shape == (PROMPT, BLOCKS, HIDDEN)
    assert np.abs(alone[0] - every[-1]).max() < 1e-5
    assert np.abs(alone_logits - every_logits).max() < 1e-4
    # What block 2 (the last) reads is its output after the last row's own addition.
    without_last = _read(lane, {1: additions[1]}, every_row_logits=False)[1]
    assert np.abs(alone[0, 2] - without_last[0, 2] - additions[2][-1]).max() < 1e-5
    assert np.abs(alone[0, :2] - without_last[0, :2]).max() == 0


def test_a_gguf_model_without_the_compiled_callback_refuses_to_load_its_per_row_lane(
    llama_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if setup.py had found no C compiler: the import of the extension fails.
    monkeypatch.setitem(sys.modules, "server.engine.llamacpp._row_callback", None)
    monkeypatch.delattr(llamacpp, "_row_callback", raising=False)
    row_callback._compiled.cache_clear()
    try:
        with pytest.raises(EngineError, match=r"compiled evaluation callback.*--no-gguf-mixed-context"):
            LlamaCppBackend.load(llama_gguf, contexts=1)
    finally:
        row_callback._compiled.cache_clear()


def test_a_sequence_copied_into_another_lane_goes_on_as_it_would_have(model: Any) -> None:
    """The scheduler moves a running request between lanes by copying its cache cells: the next
    token's logits are the ones the first lane gives, and a lane without room says so."""
    source, target, small = _lane(model, 512, False), _lane(model, 512, True), _lane(model, 256, True)
    try:
        length = 300
        source.decode([TokenSlot(5 + p % 50, p, 0, p == length - 1) for p in range(length)])
        assert not source.copy_cells(0, small, 0)  # 300 cells do not fit in 256
        assert source.copy_cells(0, target, 1)
        expected = source.decode([TokenSlot(9, length, 0, True)])[0]
        assert np.abs(target.decode([TokenSlot(9, length, 1, True)])[0] - expected).max() < 1e-4
        # The same token without those cells is another computation.
        assert np.abs(small.decode([TokenSlot(9, length, 0, True)])[0] - expected).max() > 1e-2
    finally:
        for lane in (source, target, small):
            lane.close()
