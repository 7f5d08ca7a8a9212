"""What the OpenAI sampling fields must do, checked through the official client on any served model.

Every engine's tests call these on their own server (HF and llama.cpp in test_openai_fields.py, vLLM
in test_api_vllm.py), so the fields mean the same thing on every engine.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.api_helpers import QUESTION, chat, complete  # noqa: F401 - the checks' callers take them from here

# Greedy with every penalty: engines on the same weights must give the same answer.
PENALIZED = {"max_tokens": 16, "frequency_penalty": 0.7, "presence_penalty": 0.3, "repetition_penalty": 1.6}


def token_ids(response: Any) -> list[int]:
    """The answer's token ids, from logprobs asked with return_tokens_as_token_ids."""
    return [int(entry.token.removeprefix("token_id:")) for entry in response.choices[0].logprobs.content]


def check_chat_logprobs(client: openai.OpenAI, model: str, persona: str) -> list[Any]:
    """Greedy logprobs describe the steered model's distribution; streamed ones are the same."""
    response = chat(client, model, logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 10
    for entry in entries:
        top = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] <= 0
        assert entry.logprob == pytest.approx(top[0], abs=1e-5)  # greedy takes the likeliest
        assert entry.bytes == list(entry.token.encode())
    steered = chat(client, model, logprobs=True, top_logprobs=3, persona=persona).choices[0].logprobs.content
    assert steered[0].top_logprobs[0].logprob != pytest.approx(entries[0].top_logprobs[0].logprob, abs=1e-4)

    stream = chat(client, model, logprobs=True, top_logprobs=3, stream=True)
    streamed = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-6)
    plain = chat(client, model)
    assert (
        plain.choices[0].logprobs is None
        and plain.choices[0].message.content == response.choices[0].message.content
    )
    return entries


def check_text_logprobs(client: openai.OpenAI, model: str) -> None:
    """The legacy completions shape: tokens, their logprobs, alternatives and text offsets."""
    # Named by id: two tokens may share a text (lone bytes decode to U+FFFD), never an id.
    response = complete(client, model, "the sea is", logprobs=2, return_tokens_as_token_ids=True)
    logprobs = response.choices[0].logprobs
    count = response.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count
    for token, logprob, alternatives in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert alternatives[token] == pytest.approx(logprob) and 2 <= len(alternatives) <= 3
        assert logprob == pytest.approx(max(alternatives.values()), abs=1e-5)  # greedy
    texts = complete(client, model, "the sea is", logprobs=2).choices[0].logprobs
    assert texts.token_logprobs == pytest.approx(logprobs.token_logprobs)
    offsets = [0]
    for token in texts.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert texts.text_offset == offsets


def check_n_answers(client: openai.OpenAI, model: str) -> None:
    """n answers are those of seed, seed + 1, ...: each equals the single answer of its seed."""
    sampled = {"temperature": 1.0, "max_tokens": 8}
    response = chat(client, model, n=3, seed=11, **sampled)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in response.choices]
    assert texts == [chat(client, model, seed=11 + i, **sampled).choices[0].message.content for i in range(3)]
    assert len(set(texts)) > 1 and response.usage.completion_tokens == 24

    streamed: dict[int, str] = {}
    finishes: Counter[int] = Counter()
    for chunk in chat(
        client, model, n=3, seed=11, stream=True, stream_options={"include_usage": True}, **sampled
    ):
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == 24
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] += choice.finish_reason is not None
    assert [streamed[i] for i in range(3)] == texts and finishes == Counter({0: 1, 1: 1, 2: 1})


def check_seed_in_a_batch(client: openai.OpenAI, model: str) -> None:
    """A seeded answer is the same alone and among other requests."""
    sampled = {"temperature": 1.0, "seed": 5, "max_tokens": 10}
    alone = chat(client, model, **sampled).choices[0].message.content
    assert chat(client, model, **sampled).choices[0].message.content == alone
    others = [{"temperature": 1.0, "seed": 100 + i, "max_tokens": 14} for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, client, model, **fields) for fields in [*others, sampled]]
        answers = [future.result().choices[0].message.content for future in futures]
    assert answers[-1] == alone


def check_penalties(client: openai.OpenAI, model: str) -> None:
    """Frequency and presence penalties, as OpenAI defines them: at every step the greedy token is the
    best of the raw logprobs minus 1.5 x its count so far minus 0.5 if it was used."""
    response = chat(
        client,
        model,
        max_tokens=16,
        logprobs=True,
        top_logprobs=20,
        return_tokens_as_token_ids=True,
        frequency_penalty=1.5,
        presence_penalty=0.5,
    )
    counts: Counter[str] = Counter()
    changed = False
    for entry in response.choices[0].logprobs.content:

        def penalized(token: str, logprob: float) -> float:
            return logprob - 1.5 * counts[token] - 0.5 * (counts[token] > 0)

        best = max(penalized(a.token, a.logprob) for a in entry.top_logprobs)
        assert penalized(entry.token, entry.logprob) >= best - 1e-4
        changed |= entry.token != entry.top_logprobs[0].token
        counts[entry.token] += 1
    assert changed, "the answer never met a penalized token: the check proved nothing"
    plain = chat(client, model, max_tokens=16).choices[0].message.content
    assert response.choices[0].message.content != plain


def check_truncations(client: openai.OpenAI, model: str) -> None:
    """top_k = 1 and min_p = 1 leave only the likeliest token: sampling becomes greedy."""
    greedy = chat(client, model).choices[0].message.content
    hot = {"temperature": 1.5, "seed": 3}
    assert chat(client, model, top_k=1, **hot).choices[0].message.content == greedy
    assert chat(client, model, min_p=1.0, **hot).choices[0].message.content == greedy
    assert chat(client, model, **hot).choices[0].message.content != greedy


def check_stop_ids_and_min_tokens(client: openai.OpenAI, model: str) -> None:
    """A stop id ends the answer (not part of its text); min_tokens holds it back until then."""
    with_ids = {"logprobs": True, "return_tokens_as_token_ids": True, "max_tokens": 12}
    plain = chat(client, model, **with_ids)
    ids = token_ids(plain)
    k = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    stopped = chat(client, model, stop_token_ids=[ids[k]], **with_ids)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == k + 1
    assert token_ids(stopped) == ids[: k + 1]
    assert plain.choices[0].message.content.startswith(stopped.choices[0].message.content)
    held = chat(client, model, stop_token_ids=[ids[k]], min_tokens=12, **with_ids)
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 12
    assert token_ids(held)[:k] == ids[:k] and token_ids(held)[k] != ids[k]


def check_prompts_and_echo(client: openai.OpenAI, model: str) -> None:
    """A list of prompts: n answers each, numbered prompt by prompt; echo begins with the prompt."""
    prompts = ["the sea is", "a ship"]
    solo = [complete(client, model, prompt) for prompt in prompts]
    response = complete(client, model, prompts, n=2)
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    expected = [s.choices[0].text for s in solo for _ in range(2)]
    assert [choice.text for choice in response.choices] == expected
    assert response.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in solo)
    assert response.usage.completion_tokens == 4 * 6

    streamed: dict[int, str] = {}
    for chunk in complete(client, model, prompts, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(4)] == expected
    echoed = complete(client, model, prompts[1], echo=True)
    assert echoed.choices[0].text == prompts[1] + expected[2]


def check_unsupported_combinations(client: openai.OpenAI, model: str, persona: str) -> None:
    """What cannot be served together is a 400 naming the field."""
    for fields, param in [
        ({"n": 2, "persona_monitor": [persona]}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, model, **fields)
        assert refused.value.param == param, refused.value.body
    for fields, param in [({"echo": True, "logprobs": 1}, "echo"), ({"best_of": 3}, "best_of")]:
        with pytest.raises(openai.BadRequestError) as refused:
            complete(client, model, "the sea", **fields)
        assert refused.value.param == param, refused.value.body


def check_json_refused(client: openai.OpenAI, model: str, engine: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, model, response_format={"type": "json_object"})
    assert refused.value.param == "response_format" and engine in refused.value.message


def check_json_constrained(client: openai.OpenAI, model: str) -> None:
    """An engine that constrains decoding answers JSON, even from random weights."""
    schema = {"type": "string", "enum": ["yes", "no"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    answer = chat(client, model, response_format=response_format, max_tokens=12, ignore_eos=False)
    assert json.loads(answer.choices[0].message.content) in ("yes", "no")
    anything = chat(client, model, response_format={"type": "json_object"}, max_tokens=40, ignore_eos=False)
    assert anything.choices[0].message.content.lstrip().startswith("{")
