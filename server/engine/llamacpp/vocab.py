"""A GGUF model's own tokenizer and chat template, through llama.cpp: no HF files are needed.

``decode`` has the signature TextStream expects of an HF tokenizer, so streaming, UTF-8 boundaries
and stop strings behave the same on both backends.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.base import ChatMessage, EngineError
from server.engine.prompt_bound import check_prompt_length


def _raise_exception(message: str) -> None:
    raise EngineError(message)  # templates call raise_exception() to refuse a conversation


class LlamaVocab:
    def __init__(self, model: Any) -> None:
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._pieces = [self._piece(token) for token in range(self.size)]
        self._control = [bool(llama_cpp.llama_vocab_is_control(self._vocab, t)) for t in range(self.size)]
        self._never = [False] * self.size
        self._eog = {t for t in range(self.size) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        self.max_token_chars = self._max_token_chars()
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template: str | None = template.decode() if template else None
        self._template = None
        if self.chat_template:
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _raise_exception
            self._template = environment.from_string(self.chat_template)

    def _piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[:size]

    def __len__(self) -> int:
        return self.size

    def _max_token_chars(self) -> int | None:
        """The most bytes (so characters) of text one token stands for, when every byte has a token
        of its own (byte-level BPE, SentencePiece with byte fallback); else None: llama.cpp drops
        bytes it has no token for, so a text may need fewer tokens than any bound says."""
        kind = llama_cpp.llama_vocab_type(self._vocab)
        if kind not in (llama_cpp.LLAMA_VOCAB_TYPE_BPE, llama_cpp.LLAMA_VOCAB_TYPE_SPM):
            return None
        if len({piece for piece in self._pieces if len(piece) == 1}) < 256:
            return None
        return max(len(piece) for piece in self._pieces)

    @property
    def eog_tokens(self) -> set[int]:
        return set(self._eog)

    def token_text(self, token: int) -> str:
        return self._pieces[token].decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
        if count < 0:
            tokens = (llama_cpp.llama_token * -count)()
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, -count, add_special, True)
        return list(tokens[:count])

    def prompt_ids(
        self, prompt: str | None, messages: Sequence[ChatMessage] | None, max_context: int
    ) -> list[int]:
        """Raw text, or messages via the chat template; refused before tokenizing when too long."""
        if messages is None:
            check_prompt_length(prompt or "", self.max_token_chars, max_context)
            return self.tokenize(prompt or "", add_special=True)
        if self._template is None:
            raise EngineError("this GGUF model has no chat template; use the completions endpoint")
        bos = self.token_text(llama_cpp.llama_vocab_bos(self._vocab)) if self._add_bos else ""
        eos_id = llama_cpp.llama_vocab_eos(self._vocab)
        try:
            text = self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=bos,
                eos_token=self.token_text(eos_id) if eos_id >= 0 else "",
            )
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"the chat template cannot render this conversation: {exc}") from exc
        check_prompt_length(text, self.max_token_chars, max_context)
        return self.tokenize(text, add_special=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        skipped = self._control if skip_special_tokens else self._never
        data = b"".join(self._pieces[t] for t in ids if 0 <= t < self.size and not skipped[t])
        return data.decode("utf-8", errors="replace")
