"""Incremental detokenization with stop strings.

Text is released only once it is stable: never in the middle of a multi-byte character, and never a
piece that might turn out to be the start of a stop string. A stop string ends the generation and is
not part of the output, as in the OpenAI API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        # Below min_tokens no stop string ends the answer (as in vLLM); text released until then is
        # never searched again, so a stop string must begin after it.
        self._min_tokens = min_tokens
        self._stop_floor = 0
        self._ids: list[int] = []
        self._prefix_offset = 0  # decoding restarts here, so word-boundary spaces come out right
        self._read_offset = 0  # tokens before this are already part of ``text``
        self.text = ""
        self._sent = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's text alone, special tokens included (the ``token`` of its logprobs)."""
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False))

    @property
    def _stops_apply(self) -> bool:
        return len(self._ids) >= self._min_tokens

    def push(self, token_id: int) -> str:
        """Add a generated token; return the newly releasable text ('' if none yet)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        if self._stops_apply:
            self._apply_stop()
            return self._release(final=self.stopped)
        piece = self._release(final=True)
        self._stop_floor = self._sent
        return piece

    def finish(self) -> str:
        """The rest of the text when the generation ends for any reason."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self.text += self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]
            self._read_offset = len(self._ids)
            if self._stops_apply:
                self._apply_stop()
        return self._release(final=True)

    def _apply_stop(self) -> None:
        # A stop string can only newly appear in the part not yet released plus its overlap.
        longest = max((len(s) for s in self._stop), default=0)
        start = max(self._stop_floor, self._sent - longest)
        hits = [index for s in self._stop if (index := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self.text) - self._sent), best, -1):
                if self.text.endswith(stop[:size]):
                    best = size
                    break
        return best

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        piece = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return piece
