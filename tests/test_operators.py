"""Steering operators beyond addition (server/steering/operators.py; docs/design.md, "Steering
operators"): ablate and cap on the HF engine against a hand computation, their bit-exact no-ops,
mixed batches, and the request fields through the openai client."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from server.engine.hf.kv_batch import KVBatch
from server.engine.hf.runner import ModelRunner
from server.steering.plan import EditTerm, Positions, SteeringPlan
from tests.api_helpers import API_KEY, GGUF, LLAMA, QUESTION, assert_openai_error, random_vector, upload

PROMPT = [5, 17, 42, 9, 100, 23, 7]


def post_chat(server: Any, **fields: Any) -> httpx.Response:
    """A short chat request to the tiny Llama with ``fields`` added, over plain HTTP."""
    body = {"model": LLAMA, "messages": QUESTION, "max_tokens": 4, **fields}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def on_server(test: Any) -> Any:
    """The marks of a test on the session server (it serves a GGUF model too)."""
    return pytest.mark.integration(pytest.mark.llama_cpp(test))


LAYER = 1


class EditOutput(nn.Module):
    """Stands in for block ``LAYER``: runs it, then edits its output by hand, in float64."""

    def __init__(
        self, block: nn.Module, unit: torch.Tensor, alpha: float, low: float, high: float, start: int = 0
    ) -> None:
        super().__init__()
        self.block, self.unit, self.alpha, self.low, self.high = block, unit.double(), alpha, low, high
        self.start = start  # the first position edited

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        h = hidden.double()
        p = h @ self.unit
        wanted = ((1 - self.alpha) * p).clamp(min=self.low, max=self.high)
        wanted[..., : self.start] = p[..., : self.start]
        edited = (h + (wanted - p)[..., None] * self.unit).to(hidden.dtype)
        return edited if isinstance(out, torch.Tensor) else (edited, *out[1:])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


def hand_logits(
    model: nn.Module, tokens: list[int], unit: torch.Tensor, edit: tuple[float, float, float], start: int = 0
) -> torch.Tensor:
    """The logits of ``tokens`` with block LAYER's output edited by hand from position ``start``."""
    blocks = ModelRunner(model).layout.blocks
    original = blocks[LAYER]
    blocks[LAYER] = EditOutput(original, unit, *edit, start=start)
    try:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0]
    finally:
        blocks[LAYER] = original


def engine_logits(
    runner: ModelRunner, plans: list[SteeringPlan | None], steps: int = 2
) -> list[torch.Tensor]:
    """Row 0's logits: its prefill (beside a longer neighbour when two plans are given), then
    ``steps`` greedy decode steps."""
    prompts = [PROMPT, [5, 9, 14, 3, 8, 21, 2, 13, 6, 10]][: len(plans)]
    logits, cache, mask = runner.prefill(prompts, plans)
    batch = KVBatch()
    batch.append(cache, mask)
    steering = runner.decode_steering(plans)
    out, fed = [logits[0]], [int(logits[row].argmax()) for row in range(len(plans))]
    for _ in range(steps):
        step = runner.decode(batch, fed, steering)
        out.append(step[0])
        fed = [int(step[row].argmax()) for row in range(len(plans))]
    return out


def edited_plan(vector: torch.Tensor, alpha: float, low: float, high: float) -> SteeringPlan:
    return SteeringPlan.compose([EditTerm({LAYER: vector}, alpha, low, high)])


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def readings(model: nn.Module, unit: torch.Tensor) -> torch.Tensor:
    """The unsteered projections on ``unit`` at block LAYER's output, over the prompt."""
    seen: list[torch.Tensor] = []
    block = ModelRunner(model).layout.blocks[LAYER]
    handle = block.register_forward_hook(
        lambda _m, _a, out: seen.append((out if isinstance(out, torch.Tensor) else out[0])[0] @ unit)
    )
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("operator", ["ablate", "ablate-half", "cap-max", "cap-min", "cap-both"])
@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "in-mixed-batch"])
def test_each_operator_equals_the_edit_written_by_hand(
    model: nn.Module, operator: str, grouped: bool
) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(7)) * 3
    unit = vector / vector.norm()
    seen = readings(model, unit)
    middle = float(seen.median())
    edit = {
        "ablate": (1.0, -math.inf, math.inf),
        "ablate-half": (0.5, -math.inf, math.inf),
        "cap-max": (0.0, -math.inf, middle),
        "cap-min": (0.0, middle, math.inf),
        "cap-both": (0.0, middle - 0.1, middle + 0.1),
    }[operator]
    plan = edited_plan(vector, *edit)
    runner = ModelRunner(model)
    neighbour = SteeringPlan({0: torch.randn(64), LAYER: torch.randn(64)}, strength=2.0)
    got = engine_logits(runner, [plan, neighbour] if grouped else [plan])
    runner.hooks.remove()
    generated = [int(step.argmax()) for step in got[:-1]]
    expected = hand_logits(model, PROMPT + generated, unit, edit)[len(PROMPT) - 1 :]
    plain = hand_logits(model, PROMPT + generated, unit, (0.0, -math.inf, math.inf))[len(PROMPT) - 1 :]
    assert (torch.stack(got) - expected).abs().max().item() < 1e-4
    assert (torch.stack(got) - plain).abs().max().item() > 1e-3  # the edit changed something


def test_a_cap_above_every_reading_is_bit_identical_to_no_steering(model: nn.Module) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(8))
    seen = readings(model, vector / vector.norm())
    runner = ModelRunner(model)
    capped = engine_logits(
        runner, [edited_plan(vector, 0.0, float(seen.min()) - 100, float(seen.max()) + 100)]
    )
    plain = engine_logits(runner, [None])
    runner.hooks.remove()
    assert all(torch.equal(a, b) for a, b in zip(capped, plain, strict=True))


def test_ablate_leaves_no_projection_on_the_direction_at_the_blocks_output(model: nn.Module) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(9))
    unit = vector / vector.norm()
    runner = ModelRunner(model)  # its steering hooks run before the reading hook registered below
    seen: list[torch.Tensor] = []
    block = runner.layout.blocks[LAYER]
    handle = block.register_forward_hook(
        lambda _m, _a, out: seen.append((out if isinstance(out, torch.Tensor) else out[0]) @ unit)
    )
    engine_logits(runner, [edited_plan(vector, 1.0, -math.inf, math.inf)], steps=1)
    handle.remove()
    runner.hooks.remove()
    assert readings(model, unit).abs().max() > 0.05  # there was something to remove
    assert max(float(reading.abs().max()) for reading in seen) < 1e-5


def test_an_addition_then_a_cap_of_the_same_persona_applies_in_that_order(model: nn.Module) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(10))
    unit = vector / vector.norm()
    plan = SteeringPlan.compose([({LAYER: vector}, 4.0), EditTerm({LAYER: vector}, 0.0, -math.inf, 0.0)])
    runner = ModelRunner(model)
    seen: list[torch.Tensor] = []
    block = runner.layout.blocks[LAYER]
    handle = block.register_forward_hook(
        lambda _m, _a, out: seen.append((out if isinstance(out, torch.Tensor) else out[0]) @ unit)
    )
    engine_logits(runner, [plan], steps=1)
    handle.remove()
    runner.hooks.remove()
    assert max(float(reading.max()) for reading in seen) <= 1e-5  # the push was capped at 0
    with pytest.raises(ValueError, match="list the added persona before the edit"):
        SteeringPlan.compose([EditTerm({LAYER: vector}, 1.0), ({LAYER: vector}, 4.0)])


def test_edits_follow_the_positions_rule(model: nn.Module) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(11)) * 3
    term = EditTerm({LAYER: vector}, 1.0)
    runner = ModelRunner(model)
    prompt_only = engine_logits(runner, [SteeringPlan.compose([term], positions=Positions.PROMPT)])
    everywhere = engine_logits(runner, [SteeringPlan.compose([term], positions=Positions.ALL)])
    response = engine_logits(runner, [SteeringPlan.compose([term], positions=Positions.RESPONSE)])
    runner.hooks.remove()
    assert torch.equal(prompt_only[0], everywhere[0])  # the prefill is edited alike
    assert not torch.equal(prompt_only[1], everywhere[1])  # generated tokens only under "all"
    # "response": the last prompt token and each generated token, as for an addition.
    generated = [int(step.argmax()) for step in response[:-1]]
    unit = vector / vector.norm()
    expected = hand_logits(model, PROMPT + generated, unit, (1.0, -math.inf, math.inf), start=len(PROMPT) - 1)
    assert (torch.stack(response) - expected[len(PROMPT) - 1 :]).abs().max().item() < 1e-4


# Through the server and the openai client.


@on_server
def test_operators_through_the_openai_client(client: openai.OpenAI, personas: dict[str, Any]) -> None:
    def answer(**fields: Any) -> str:
        completion = client.chat.completions.create(
            model=LLAMA, messages=QUESTION, max_tokens=8, temperature=0, seed=1, extra_body=fields
        )
        return completion.choices[0].message.content or ""

    pushed = [{"name": "pirate", "strength": 12.0}]
    added = answer(persona=pushed)
    assert added != answer()
    # A cap above every reading changes nothing; ablating the pushed persona undoes some of the push.
    assert answer(persona=[*pushed, {"name": "pirate", "operator": "cap", "max": 1e6}]) == added
    assert answer(persona=[*pushed, {"name": "pirate", "operator": "ablate"}]) != added
    # The single-persona fields are the same request as a one-term list.
    assert answer(persona="pirate", persona_operator="ablate") == answer(
        persona=[{"name": "pirate", "operator": "ablate"}]
    )
    assert answer(persona="pirate", persona_cap_max=0.0) == answer(
        persona=[{"name": "pirate", "operator": "cap", "max": 0.0}]
    )


@on_server
@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"persona": "pirate", "persona_operator": "cap"}, "persona_operator", "needs max, min or both"),
        (
            {"persona": "pirate", "persona_cap_max": 1.0, "persona_strength": 2.0},
            "persona_strength",
            "no strength",
        ),
        (
            {"persona": "pirate", "persona_cap_max": 1.0, "persona_cap_min": 2.0},
            "persona_cap_max",
            "above max",
        ),
        (
            {"persona": "pirate", "persona_operator": "ablate", "persona_cap_max": 1.0},
            "persona_cap_max",
            "bound a cap",
        ),
        ({"persona_operator": "ablate"}, "persona_operator", "need a persona"),
        (
            {"persona": [{"name": "pirate"}], "persona_operator": "ablate"},
            "persona_operator",
            "each listed persona",
        ),
        (
            {"persona": [{"name": "pirate", "operator": "ablate"}, {"name": "pirate"}]},
            "persona",
            "before the edit",
        ),
        (
            {
                "persona": "pirate",
                "persona_operator": "ablate",
                "persona_monitor": ["pirate"],
                "persona_monitor_tokens": True,
            },
            "persona_operator",
            "do not combine",
        ),
    ],
)
def test_operator_fields_that_do_not_go_together_are_400(
    server: Any, personas: dict[str, Any], fields: dict[str, Any], param: str, fragment: str
) -> None:
    response = post_chat(server, **fields)
    error = assert_openai_error(response, 400, fragment)
    assert error["param"] == param, error


@on_server
def test_an_unknown_operator_is_refused_as_a_bad_value(server: Any, personas: dict[str, Any]) -> None:
    response = post_chat(server, persona="pirate", persona_operator="shrink")
    assert assert_openai_error(response, 422, "'add', 'ablate' or 'cap'")["param"] == "persona_operator"


@on_server
@pytest.mark.parametrize(
    "terms",
    [
        [{"name": "pirate", "operator": "ablate"}],
        [{"name": "pirate", "operator": "ablate", "strength": 0.5}],
        [{"name": "pirate", "strength": 12.0}, {"name": "pirate", "operator": "cap", "max": 0.0}],
        [
            {"name": "pirate", "strength": -12.0},
            {"name": "pirate", "operator": "cap", "min": -0.5, "max": 0.5},
        ],
    ],
    ids=["ablate", "ablate-half", "add-then-cap", "add-then-cap-both"],
)
def test_the_same_operators_give_the_same_answer_on_hf_and_llama_cpp(
    client: openai.OpenAI, server: Any, personas: dict[str, Any], terms: list[dict[str, Any]]
) -> None:
    """The GGUF model is the tiny Llama's very weights: its per-row lane edits in compiled C what
    the HF hooks edit in torch."""
    ensure_on_gguf(server, personas)

    def answer(model: str, persona: Any) -> tuple[str, list[float]]:
        completion = client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            logprobs=True,
            extra_body={"persona": persona},
        )
        choice = completion.choices[0]
        return choice.message.content or "", [token.logprob for token in choice.logprobs.content]

    hf_text, hf_logprobs = answer(LLAMA, terms)
    gguf_text, gguf_logprobs = answer(GGUF, terms)
    assert gguf_text == hf_text
    assert max(abs(a - b) for a, b in zip(hf_logprobs, gguf_logprobs, strict=True)) < 1e-3
    if len(terms) > 1:  # the cap acted: the answer is not the added persona's alone
        assert hf_text != answer(LLAMA, terms[:1])[0]


def ensure_on_gguf(server: Any, personas: dict[str, Any]) -> None:
    """pirate on the GGUF model too: the vector the session's personas gave it on its HF twin."""
    response = upload(server.url, "pirate", GGUF, {1: random_vector(64, 1)}, 6.0)
    assert response.status_code == 200, response.text


def test_an_engine_without_an_operator_refuses_it_by_name() -> None:
    import asyncio

    from server.engine.base import ModelInfo
    from server.serving.completion_job import PersonaTerm
    from server.serving.errors import RequestRejected
    from server.serving.personas import resolve_personas

    info = ModelInfo("m", "vllm", 2, 8, 64, (0, 1), operators=("add",))
    with pytest.raises(RequestRejected, match="does not apply operator 'cap'") as refused:
        asyncio.run(resolve_personas(None, info, [PersonaTerm("p", None, "cap", 1.0)], None, None, 10.0))  # type: ignore[arg-type]
    assert refused.value.param == "persona"


@on_server
def test_the_answer_echoes_each_personas_operator(server: Any, personas: dict[str, Any]) -> None:
    capped = [{"name": "pirate", "strength": 3.0}, {"name": "pirate", "operator": "cap", "max": 0.5}]
    response = post_chat(server, persona=capped)
    assert response.status_code == 200, response.text
    echoed = response.json()["persona"]
    assert echoed[0]["name"] == "pirate" and "operator" not in echoed[0]
    assert echoed[1]["operator"] == "cap" and echoed[1]["max"] == 0.5 and echoed[1]["strength"] is None


@on_server
@pytest.mark.parametrize("model", [LLAMA, GGUF])
def test_operators_mixed_in_one_batch_equal_their_solo_answers(
    client: openai.OpenAI, server: Any, personas: dict[str, Any], model: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ensure_on_gguf(server, personas)
    requests: list[Any] = [
        None,
        "pirate",
        [{"name": "pirate", "operator": "ablate"}],
        [{"name": "pirate", "strength": 12.0}, {"name": "pirate", "operator": "cap", "max": 0.0}],
        [{"name": "pirate", "strength": -12.0}, {"name": "pirate", "operator": "cap", "min": 0.0}],
    ]

    def answer(persona: Any) -> str:
        completion = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=16, temperature=0, extra_body={"persona": persona}
        )
        return completion.choices[0].message.content or ""

    solo = [answer(persona) for persona in requests]
    with ThreadPoolExecutor(len(requests) * 2) as pool:
        together = list(pool.map(answer, requests * 2))
    assert together == solo * 2
    assert len(set(solo)) >= 2  # the batch mixes answers that differ


@pytest.mark.slow  # a demo model answers the 28 held-out questions under five conditions: ~10 s
def test_cap_and_ablate_bring_a_pushed_persona_back_to_unsteered_on_a_demo_model() -> None:
    import asyncio

    from server.demo.models import demo_model_dir, load_demo_personas
    from server.engine.registry import load_backend
    from server.evaluation.operator_table import operator_rows

    async def rows() -> dict[str, Any]:
        backend = load_backend(demo_model_dir("demo-llama"), "demo-llama")
        try:
            pirate = next(p for p in load_demo_personas("demo-llama") if p.name == "pirate")
            return {
                row.condition: row for row in await operator_rows(backend, "demo-llama", pirate, samples=1)
            }
        finally:
            await backend.close()

    by_condition = asyncio.run(rows())
    unsteered, pushed = by_condition["unsteered"], by_condition["pushed"]
    assert pushed.markers > unsteered.markers + 0.5 and pushed.perplexity_ratio > 2
    for edited in ("pushed + cap", "pushed + ablate"):
        row = by_condition[edited]
        assert abs(row.markers - unsteered.markers) < 0.1, edited
        assert abs(row.classifier - unsteered.classifier) < 0.1, edited
        assert row.perplexity_ratio < 1.2, edited
