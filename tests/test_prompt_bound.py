"""The cheap length check of prompts (issue 14, item 1): sound for the tokenizers it bounds, absent
for those it cannot bound, the same on llama.cpp, and the default body cap that goes with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.api.body_limit import MIN_BODY_BYTES, default_body_bytes
from server.demo.models import demo_model_dir
from server.engine.base import ChatMessage, EngineError, GenerationRequest
from server.engine.llamacpp.backend import LlamaCppBackend
from server.engine.prompt_bound import check_prompt_length, hf_max_token_chars

SAMPLES = [
    "the sea storm " * 50,
    "<|im_start|>user\nahoy<|im_end|>" * 20,
    "naïve café, 東京の天気, emoji 🦜🦜 and\ttabs\n\n  spaces   ",
    "e\u0301 \u1100\u1161\u11a8 \u03b1\u0313\u0300\u0345 " * 10,  # NFC composes these: text shrinks
    "       " * 40,
]


@pytest.mark.parametrize("source", ["tiny", "demo-qwen", "demo-phi3"])
def test_no_text_needs_fewer_tokens_than_the_bound_says(source: str, llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir if source == "tiny" else demo_model_dir(source))
    longest = hf_max_token_chars(tokenizer)
    assert longest is not None
    for text in SAMPLES:
        assert len(tokenizer(text)["input_ids"]) * longest >= len(text), text


def test_the_bound_of_a_byte_level_vocabulary_is_its_longest_token(llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert hf_max_token_chars(tokenizer) == len("<|endoftext|>")
    # demo-qwen normalizes to NFC, which can shrink a text 4-fold: its bound is 4 times wider.
    qwen = AutoTokenizer.from_pretrained(demo_model_dir("demo-qwen"))
    assert hf_max_token_chars(qwen) == 4 * max(map(len, qwen.get_vocab()))


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def unbounded_tokenizers() -> Iterator[tuple[str, PreTrainedTokenizerFast]]:
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    yield (
        "an unknown word of any length is one token",
        wrap(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))),
    )
    fused = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]", fuse_unk=True))
    yield "a run of unknown characters is fused into one token", wrap(fused)
    yield "unknown characters are dropped", wrap(Tokenizer(models.BPE(vocab, [])))
    stripped = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))
    stripped.normalizer = normalizers.Strip()
    yield "the normalizer drops characters", wrap(stripped)
    split = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))
    split.pre_tokenizer = pre_tokenizers.Whitespace()
    yield "the pre-tokenizer drops whitespace", wrap(split)
    absorbing = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))
    absorbing.add_special_tokens([AddedToken("<sep>", rstrip=True, special=True)])
    yield "a token takes in the whitespace after it", wrap(absorbing)


@pytest.mark.parametrize(("why", "tokenizer"), list(unbounded_tokenizers()))
def test_tokenizers_that_may_need_fewer_tokens_get_no_bound(
    why: str, tokenizer: PreTrainedTokenizerFast
) -> None:
    assert hf_max_token_chars(tokenizer) is None, why


def test_a_bounded_tokenizer_without_fusing_gets_its_longest_token() -> None:
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    tokenizer = wrap(Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="[UNK]")))
    assert hf_max_token_chars(tokenizer) == len("[UNK]")


def test_the_check_refuses_only_what_cannot_fit() -> None:
    check_prompt_length("x" * (1023 * 13), 13, 1024)  # 1023 tokens of 13 characters leave one
    with pytest.raises(EngineError, match=r"maximum context length is 1024 tokens.*at least 1024 tokens"):
        check_prompt_length("x" * (1023 * 13 + 1), 13, 1024)
    check_prompt_length("x" * 10**7, None, 1024)  # no bound: the tokenizer decides


@pytest.fixture(scope="module")
def gguf_backend(llama_gguf: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend.load(llama_gguf, contexts=1, mixed_sequences=0, context_tokens=1024)
    yield backend
    backend.scheduler.stop()


@pytest.mark.llama_cpp
def test_llama_cpp_bounds_prompts_like_hf(gguf_backend: LlamaCppBackend, llama_dir: Path) -> None:
    assert gguf_backend.info.max_token_chars == hf_max_token_chars(AutoTokenizer.from_pretrained(llama_dir))
    for request in (
        GenerationRequest(prompt="the sea storm " * 1_500_000),
        GenerationRequest(messages=[ChatMessage("user", "")] * 200_000),
    ):
        with pytest.raises(EngineError, match="maximum context length is 1024 tokens, but the prompt has"):
            gguf_backend.prompt_ids(request)
    fits = GenerationRequest(prompt="<|endoftext|>" * 1000)  # the longest token, 13 characters each
    assert len(gguf_backend.prompt_ids(fits)) >= 1000


def test_the_default_body_cap_fits_the_largest_context() -> None:
    assert default_body_bytes(1024) == MIN_BODY_BYTES
    assert default_body_bytes(1 << 20) == 32 << 20  # a 1M-token context: 32 MiB
