"""A cheap, exact refusal of prompts that cannot fit the context, before they are tokenized.

Tokenizing is the costly step (a 20 MB prompt took 35 s and 3 GB), so a prompt is measured first in
characters. If no token of the vocabulary stands for more than ``L`` characters of text, a text of
``n`` characters needs at least ``n / L`` tokens. That holds only for tokenizers that neither drop
characters nor fuse an unbounded run of them into one token; a tokenizer that might gets no bound
(``None``), and its prompts are simply tokenized. A bound never refuses a prompt that would fit.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tokenizers.pre_tokenizers import ByteLevel

from server.engine.base import EngineError

# Pre-tokenizers that keep every character (the ones not named here may drop whitespace).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}
# Unicode's longest canonical decomposition is 4 characters, so NFC/NFKC shrink text at most 4-fold.
_NORMALIZER_SHRINK = {"NFC": 4, "NFKC": 4, "NFD": 1, "NFKD": 1, "Lowercase": 1, "Prepend": 1, "ByteLevel": 1}


def check_prompt_length(text: str, max_token_chars: int | None, max_context: int) -> None:
    """EngineError when ``text`` needs more tokens than the context leaves for the prompt (one
    token at least is generated); nothing when it may fit or the model has no bound."""
    if max_token_chars is None or len(text) <= (max_context - 1) * max_token_chars:
        return
    at_least = math.ceil(len(text) / max_token_chars)
    raise EngineError(
        f"this model's maximum context length is {max_context} tokens, but the prompt has "
        f"{len(text)} characters, at least {at_least} tokens (no token of this model spans more "
        f"than {max_token_chars} characters)"
    )


def hf_max_token_chars(tokenizer: Any) -> int | None:
    """The most characters of text one token of a transformers (fast) tokenizer can stand for, or
    None when the tokenizer may drop characters or fuse unknown ones (no sound bound exists)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer: nothing to inspect
        return None
    spec = json.loads(backend.to_str())
    shrink = _normalizer_shrink(spec.get("normalizer"))
    vocab = backend.get_vocab(with_added_tokens=True)
    if (
        shrink is None
        or not _keeps_characters(spec.get("pre_tokenizer"))
        or not _one_token_per_unknown(spec, vocab)
    ):
        return None
    # A token absorbing the whitespace around it stands for a run of any length.
    if any(token.get("lstrip") or token.get("rstrip") for token in spec.get("added_tokens", ())):
        return None
    # A vocabulary string is at least as long as the text it covers: byte-level strings have one
    # character per byte, "▁" stands for one space, "<0x0A>" for one byte.
    longest = max(len(piece) for piece in vocab)
    return longest * shrink


def _normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    """How many times shorter a normalizer can make a text (None: without bound, e.g. Strip)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", ()):
            part_factor = _normalizer_shrink(part)
            if part_factor is None:
                return None
            factor *= part_factor
        return factor
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content", "")
        if pattern is None or not content:  # a regex or a deletion: no bound
            return None
        return max(1, math.ceil(len(pattern) / len(content)))
    return _NORMALIZER_SHRINK.get(kind)


def _keeps_characters(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_characters(part) for part in spec.get("pretokenizers", ()))
    if spec.get("type") == "Split" and spec.get("behavior") == "Removed":
        return False
    return spec.get("type") in _KEEPING_PRE_TOKENIZERS


def _one_token_per_unknown(spec: dict[str, Any], vocab: dict[str, int]) -> bool:
    """Whether every character outside the vocabulary still costs a token of its own: neither
    dropped (a BPE without an unknown token) nor fused with its neighbours into one."""
    model = spec["model"]
    if model.get("byte_fallback"):
        return True
    if model.get("type") == "BPE":
        if model.get("unk_token") is None:  # an unknown byte is dropped, unless every byte is known
            byte_level = _names(spec.get("pre_tokenizer"), "ByteLevel") or _names(
                spec.get("normalizer"), "ByteLevel"
            )
            return byte_level and set(ByteLevel.alphabet()) <= vocab.keys()
        return not model.get("fuse_unk")
    return False  # Unigram fuses unknown runs; WordPiece, WordLevel make any unknown word one token


def _names(spec: dict[str, Any] | None, kind: str) -> bool:
    """Whether a (possibly nested) normalizer or pre-tokenizer spec holds one of type ``kind``."""
    if spec is None:
        return False
    parts = spec.get("pretokenizers") or spec.get("normalizers") or ()
    return spec.get("type") == kind or any(_names(part, kind) for part in parts)
