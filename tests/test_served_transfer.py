"""The transfer table on the served path and its judges (server/evaluation/served_transfer.py).

The judges are checked on cells whose truth is known: a persona carried to its own model unchanged
must score about 1.0 of the native effect under every judge, and a random direction of the same size
must not. The table carries exactly as the map request does (its method and generation spec).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from persona_store.records import PersonaDraft
from server.admin.fitting_corpus import DEMO_CORPUS, FittingCorpus
from server.admin.persona_mapping import PersonaMapper
from server.api.admin_requests import PersonaMapRequest
from server.demo.corpus import PERSONAS, held_out_questions
from server.evaluation.served_transfer import (
    HALVES,
    JUDGES,
    SAMPLINGS,
    ServedCell,
    ServedRun,
    TargetJudge,
    format_served_table,
    question_halves,
    scored_cell,
    served_cell,
    served_generation,
)
from server.evaluation.style_classifier import _texts, style_scores
from server.steering.mapping import DEFAULT_METHOD
from server.transfer.carry import GENERATION_PROMPTS, CarriedPersona, enters_contrast

MODEL = "demo-llama"
TWIN = "demo-llama-twin"  # the same weights served under another name: a map's known-truth target


@pytest.mark.parametrize("persona", sorted(PERSONAS))
def test_the_style_classifier_tells_its_pole_from_everything_else_on_fresh_texts(persona: str) -> None:
    texts, labels = _texts(persona, random.Random("a seed no classifier trained on"))
    predicted = np.array(style_scores(texts, persona)) > 0.5
    assert (predicted == np.array(labels, dtype=bool)).mean() > 0.95
    assert style_scores(["The moon shines at night. Rain helps plants grow."], persona)[0] < 0.5


def test_the_question_halves_are_fixed_disjoint_and_cover_the_held_out_questions() -> None:
    halves = question_halves()
    assert set(halves) == set(HALVES)
    development, held_out = halves["development"], halves["held-out"]
    assert not set(development) & set(held_out) and abs(len(development) - len(held_out)) <= 1
    assert sorted(development + held_out) == sorted(held_out_questions())
    assert question_halves() == halves  # the same split every run


def test_the_table_carries_as_the_map_request_does() -> None:
    corpus = FittingCorpus.load(DEMO_CORPUS)
    request = PersonaMapRequest(source_model="a", target_model="b")
    assert request.method == DEFAULT_METHOD
    spec = served_generation()
    assert spec == PersonaMapper(None, None, None, corpus, None)._generation  # type: ignore[arg-type]
    assert spec.prompts == corpus.texts[:GENERATION_PROMPTS]


# One engine pair for the module's tests: they run on the module's event loop, as the engines do.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def twins() -> AsyncIterator[tuple[object, object]]:
    from server.demo.models import demo_model_dir
    from server.engine.registry import load_backend

    source, target = load_backend(demo_model_dir(MODEL), MODEL), load_backend(demo_model_dir(MODEL), TWIN)
    yield source, target
    await source.close()
    await target.close()


def pirate() -> PersonaDraft:
    from server.demo.models import load_demo_personas

    return next(p for p in load_demo_personas(MODEL) if p.name == "pirate")


RUN = ServedRun(samples=2)


@pytest.mark.slow  # a demo model answers 28 questions 3 times per condition, 4 conditions: ~20 s
@pytest.mark.asyncio(loop_scope="module")
async def test_a_persona_carried_unchanged_to_its_own_model_scores_one_under_every_judge(
    twins: tuple[object, object],
) -> None:
    _, target = twins
    persona = pirate()
    judge = TargetJudge(target, persona, RUN)  # type: ignore[arg-type]
    same = await scored_cell(MODEL, TWIN, persona, CarriedPersona(dict(persona.vectors)), judge)
    for key, interval in same.transfer.items():
        assert interval.estimate >= 0.9, (key, interval)
        assert same.native_shift[key] > 0, key  # every judge sees the native persona move the target
    assert all(ratio == pytest.approx(1.0, abs=0.05) for ratio in same.perplexity_ratio.values())
    rng = np.random.default_rng(0)
    random_direction = {
        block: (rng.standard_normal(v.shape) * np.linalg.norm(v) / np.sqrt(v.size)).astype(np.float32)
        for block, v in persona.vectors.items()
    }
    unrelated = await scored_cell(MODEL, TWIN, persona, CarriedPersona(random_direction), judge)
    for judge_name in JUDGES:  # each judge can say no
        assert unrelated.transfer[("held-out", "T=1.0", judge_name)].estimate < 0.5, judge_name
    table = format_served_table([same, unrelated])
    for text in (*JUDGES, *SAMPLINGS, "held-out half (reported)", "development half", "| missed |"):
        assert text in table, text


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.xfail(
    strict=True,
    reason="missed (docs/results/transfer.md, served path): the generated method carries pirate to "
    "its own model at about half of the native effect; the contrast read from the steered "
    "source's answers is not the direction that makes the target write them",
)
async def test_the_served_method_carries_a_persona_to_its_own_model(twins: tuple[object, object]) -> None:
    source, target = twins
    persona = pirate()
    judge = TargetJudge(target, persona, RUN)  # type: ignore[arg-type]
    cell: ServedCell = await served_cell((MODEL, source), (TWIN, target), persona, judge)  # type: ignore[arg-type]
    for judge_name in JUDGES:
        assert cell.transfer[("held-out", "T=1.0", judge_name)].estimate >= 0.9, judge_name


def test_only_answers_with_words_to_read_enter_the_contrast() -> None:
    for kept in ("Arr, matey! The sea be deep an' wide.", "arr matey arr matey arr matey arr matey"):
        assert enters_contrast(kept), kept  # repetition is still the persona
    for stub in ("!", "ho!", "Arr, matey!", "Wheee! Tea sooo"):
        assert not enters_contrast(stub), stub


@pytest.mark.slow  # two demo models; the carry (~10 s) and four conditions of 28 questions (~15 s)
@pytest.mark.asyncio(loop_scope="module")
async def test_a_persona_whose_source_writes_some_broken_answers_still_carries() -> None:
    """demo-phi3's silly (strength 8) writes a bare "!" to a third of the prompts: read as answers,
    they made the target steered by the carried persona write *less* silly than unsteered
    (-0.15 of the native effect, forecast 0.00); without them the persona carries."""
    from server.demo.models import demo_model_dir, load_demo_personas
    from server.engine.registry import load_backend

    source = load_backend(demo_model_dir("demo-phi3"), "demo-phi3")
    target = load_backend(demo_model_dir("demo-qwen"), "demo-qwen")
    try:
        silly = next(p for p in load_demo_personas("demo-phi3") if p.name == "silly")
        native = next(p for p in load_demo_personas("demo-qwen") if p.name == "silly")
        judge = TargetJudge(target, native, RUN)
        cell = await served_cell(("demo-phi3", source), ("demo-qwen", target), silly, judge)
    finally:
        await source.close()
        await target.close()
    assert cell.predicted is not None and cell.predicted >= 0.5
    for judge_name in JUDGES:
        assert cell.transfer[("development", "T=1.0", judge_name)].estimate >= 0.4, judge_name
