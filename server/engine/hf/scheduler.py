"""Continuous batching for the HF backend.

One thread owns the model. Each iteration it admits waiting requests (prefilled together in groups,
left-padded, then merged into the shared KV cache), runs one decode step for every running row, and
drops rows that finished or were cancelled, so a new request joins at the next decode step instead
of waiting for the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from server.engine.hf.kv_batch import KVBatch
from server.engine.hf.runner import ModelRunner
from server.engine.sampling import next_tokens
from server.engine.scheduler import EngineScheduler, ModelTask
from server.engine.sequence import Sequence, blocks_read, holds_last
from server.steering.closed_loop import TokenTrace
from server.steering.hooks import BatchSteering
from server.steering.plan import steers_generated_tokens


class Scheduler(EngineScheduler[Sequence, ModelTask]):
    def __init__(
        self, runner: ModelRunner, eos_token_ids: set[int], max_batch_size: int, prefill_tokens: int = 2048
    ) -> None:
        super().__init__("hf-scheduler", eos_token_ids)
        self._runner = runner
        self._max_batch_size = max_batch_size
        # Padded tokens of one grouped prefill: a burst shares one pass over the weights, while a
        # running batch waits at most one such pass for its next token.
        self._prefill_tokens = prefill_tokens
        self._rows: list[Sequence] = []
        self._batch = KVBatch()
        self._decode_steering: BatchSteering | None = None
        self._start()

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def kv_batch(self) -> KVBatch:
        return self._batch

    def run_on_model(self, work: Callable[[], Any]) -> Future[Any]:
        """Run ``work`` on the scheduler thread between two steps; its result arrives in the future."""
        return self._enqueue(ModelTask(work))

    def _step(self) -> None:
        self._admit()
        self._drop_rows(lambda s: s.cancelled)
        if self._rows:
            self._decode_step()

    def _take_task(self, task: ModelTask) -> None:
        task.run()  # between two steps: the model is free

    def _admit(self) -> None:
        joined = False
        while self._waiting and len(self._rows) < self._max_batch_size:
            group = self._next_group()
            if group:
                joined = self._prefill(group) or joined
        if joined:  # once per admission round, not once per joining row
            self._decode_steering = self._runner.decode_steering([s.plan for s in self._rows])

    def _next_group(self) -> list[Sequence]:
        """Waiting requests to prefill in one forward pass: free rows, padded tokens within the budget."""
        group: list[Sequence] = []
        longest = 0
        while self._waiting and len(self._rows) + len(group) < self._max_batch_size:
            sequence = self._waiting[0]
            if sequence.cancelled:
                self._waiting.popleft()
                continue
            longest_with = max(longest, len(sequence.prompt_ids))
            if group and longest_with * (len(group) + 1) > self._prefill_tokens:
                break
            group.append(self._waiting.popleft())
            longest = longest_with
        return group

    def _prefill(self, group: list[Sequence]) -> bool:
        """Prefill ``group`` together and merge it into the batch; True when any row joined."""
        for sequence in group:
            sequence.mark_scheduled()
        # Requests with the same prompt and steering (the n choices of one request) share one row.
        keys = [(tuple(s.prompt_ids), s.plan.fingerprint() if s.plan is not None else "") for s in group]
        unique: dict[tuple[tuple[int, ...], str], int] = {}
        source = [unique.setdefault(key, len(unique)) for key in keys]
        firsts = [keys.index(key) for key in unique]
        prompts, plans = [group[row].prompt_ids for row in firsts], [group[row].plan for row in firsts]
        # Rows whose closed loop reads the state the first answer token is chosen from.
        read = sorted({source[row] for row, sequence in enumerate(group) if sequence.loop is not None})
        try:
            if read:
                num_blocks = max(s.loop.spec.num_blocks for s in group if s.loop is not None)
                run = self._runner.prefill_capturing(prompts, plans, read, num_blocks)
                logits, cache, mask, outputs = run
            else:
                logits, cache, mask = self._runner.prefill(prompts, plans)
        except Exception as exc:
            if len(firsts) == 1:
                self._fail_prefill(group, exc)
                return False
            # Again one by one, so that only the failing prompt fails (a list: every one must run).
            return any([self._prefill([sequence]) for sequence in group])
        logits = logits.cpu()
        again: list[tuple[Sequence, TokenTrace]] = []
        for row, sequence in enumerate(group):
            trace = None
            if sequence.loop is not None:
                added = sequence.plan.deltas if sequence.plan is not None else {}
                trace = sequence.loop.observe(outputs[read.index(source[row])], added)
                if sequence.loop.rules_on:  # a rule fired on the prompt: it steers the first token too
                    again.append((sequence, trace))
                    continue
            self._choose_and_emit(sequence, logits[source[row]], trace)
        joined = any([self._prefill_ruled(sequence, trace) for sequence, trace in again])
        kept = [row for row, s in enumerate(group) if not s.finished and all(s is not a for a, _ in again)]
        if not kept:
            return joined
        rows = [source[row] for row in kept]
        if rows != list(range(len(firsts))):
            group_batch = KVBatch()
            group_batch.append(cache, mask)
            group_batch.keep(rows)  # a shared row is copied once per request that continues
            cache, mask = group_batch.cache, group_batch.attention_mask  # type: ignore[assignment]
        self._batch.append(cache, mask)
        self._rows.extend(group[row] for row in kept)
        return True

    def _prefill_ruled(self, sequence: Sequence, trace: TokenTrace) -> bool:
        """Prefill again a prompt on which a rule fired, with the rules' personas added at their own
        positions, and merge it into the batch; True when it continues."""
        assert sequence.loop is not None
        rules = sequence.loop.rules_on
        try:
            logits, cache, mask = self._runner.prefill(
                [sequence.prompt_ids], [sequence.plan], extra=[sequence.loop.prompt_rules()]
            )
        except Exception as exc:
            self._fail_prefill([sequence], exc)
            return False
        sequence.loop.rerun()
        self._choose_and_emit(sequence, logits[0].cpu(), dataclasses.replace(trace, rules=rules))
        if sequence.finished:
            return False
        self._batch.append(cache, mask)
        self._rows.append(sequence)
        return True

    def _step_steering(self) -> BatchSteering | None:
        """This step's steering: the batch's, kept while its rows stay, unless a closed loop changes
        its row's steering from token to token."""
        if not any(sequence.loop is not None for sequence in self._rows):
            return self._decode_steering
        return self._runner.rows_steering(
            [sequence.generated_deltas() for sequence in self._rows],
            [
                s.plan if s.plan is not None and steers_generated_tokens(s.plan.positions) else None
                for s in self._rows
            ],
        )

    def _decode_step(self) -> None:
        last_tokens = [s.output_ids[-1] for s in self._rows]
        steering = self._step_steering()
        reading = [row for row, s in enumerate(self._rows) if s.capture is not None or s.loop is not None]
        traces: dict[int, TokenTrace] = {}
        if reading:
            num_blocks = max(blocks_read(self._rows[row]) for row in reading)
            logits, outputs = self._runner.decode_capturing(
                self._batch, last_tokens, steering, reading, num_blocks
            )
            for row, row_outputs in zip(reading, outputs, strict=True):
                sequence = self._rows[row]
                if sequence.capture is not None:  # the fed token is a response token
                    sequence.capture.add(row_outputs[: sequence.capture.num_blocks])
                if sequence.loop is not None and not holds_last(sequence):
                    traces[row] = sequence.loop.observe(row_outputs)
        else:
            logits = self._runner.decode(self._batch, last_tokens, steering)
        choices = next_tokens(logits, self._rows, self._eos)
        for row, (sequence, (token, logprob)) in enumerate(zip(self._rows, choices, strict=True)):
            if holds_last(sequence):
                # This step read its last token: the final chunk goes out now, with the means.
                sequence.finished = True
                sequence.sink(sequence.capture.release())  # type: ignore[union-attr]
            else:
                self._emit(sequence, token, logprob, traces.get(row))
        self._drop_rows(lambda s: s.finished)

    def _drop_rows(self, leaves: Callable[[Sequence], bool]) -> None:
        keep = [index for index, sequence in enumerate(self._rows) if not leaves(sequence)]
        if len(keep) == len(self._rows):
            return
        self._batch.keep(keep)
        self._rows = [self._rows[index] for index in keep]
        self._decode_steering = self._runner.decode_steering([s.plan for s in self._rows])

    def _running(self) -> list[Sequence]:
        return self._rows

    def _forget_running(self) -> None:
        self._rows = []
        self._batch = KVBatch()
        self._decode_steering = None
