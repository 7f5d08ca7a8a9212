"""The transfer protocol's parts: leave-one-persona-out fitting texts and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from server.admin.fitting_corpus import DEMO_CORPUS, FittingCorpus
from server.demo.corpus import PERSONAS, neutral_texts
from server.demo.traits import trait_rate
from server.evaluation.intervals import Interval, transfer_interval


def test_the_default_corpus_is_the_shipped_one_and_each_left_out_style_is_absent() -> None:
    full = neutral_texts()
    assert full == list(FittingCorpus.load(DEMO_CORPUS).texts)
    for persona in PERSONAS:
        assert trait_rate(full, persona) > 0.03  # the full corpus carries a touch of every style
        left_out = neutral_texts(without=[persona])
        assert len(left_out) == len(full) and trait_rate(left_out, persona) == 0.0
        for other in set(PERSONAS) - {persona}:
            assert trait_rate(left_out, other) > 0.03  # the other styles stay: the map still sees style


def scores(rate: float, questions: int, samples: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return (rng.random(questions * samples) < rate).astype(float).tolist()


def test_the_interval_covers_the_true_ratio_and_narrows_with_samples() -> None:
    questions = 28

    def interval(samples: int) -> Interval:
        mapped, unsteered, native = (
            scores(rate, questions, samples, seed) for seed, rate in enumerate((0.5, 0.1, 0.9))
        )
        return transfer_interval(mapped, unsteered, native, questions)

    wide, narrow = interval(2), interval(40)
    for interval in (wide, narrow):
        assert interval.low < 0.5 < interval.high and interval.low <= interval.estimate <= interval.high
    assert narrow.half_width < 0.1 < wide.half_width
    assert narrow.estimate == pytest.approx(0.5, abs=0.05)


def test_overshoot_counts_as_one_and_a_bad_layout_is_refused() -> None:
    questions = 10
    high = scores(0.95, questions, 20, 1)
    capped = transfer_interval(
        high, scores(0.05, questions, 20, 2), scores(0.5, questions, 20, 3), questions, overshoot_cap=1.0
    )
    assert capped.estimate == capped.high == 1.0
    raw = transfer_interval(high, scores(0.05, questions, 20, 2), scores(0.5, questions, 20, 3), questions)
    assert raw.estimate > 1.5
    with pytest.raises(ValueError, match="divide"):
        transfer_interval([1.0] * 7, [0.0] * 7, [1.0] * 7, questions=2)


@pytest.mark.slow  # demo models answer and are read back, in process: up to a minute
async def test_a_persona_carried_by_generated_text_points_where_the_native_one_does() -> None:
    from server.demo.corpus import training_questions
    from server.demo.models import demo_model_dir, load_demo_personas
    from server.engine.registry import load_backend
    from server.transfer.carry import GenerationSpec, carry_by_generation

    llama, qwen = (load_backend(demo_model_dir(name), name) for name in ("demo-llama", "demo-qwen"))
    try:
        pirate = {p.name: p for p in load_demo_personas("demo-qwen")}["pirate"]
        native = {p.name: p for p in load_demo_personas("demo-llama")}["pirate"]
        spec = GenerationSpec(prompts=tuple(q for _, q in training_questions()[::3]), seed=7)
        carried = await carry_by_generation(
            qwen, llama, pirate.vectors, pirate.default_strength, pirate.default_positions, spec
        )
        assert sorted(carried.vectors) == sorted(pirate.vectors)  # both demo models have 4 blocks
        for block, vector in carried.vectors.items():
            assert vector.shape == (128,) and vector.dtype == np.float32
            cosine = (
                vector
                @ native.vectors[block]
                / np.linalg.norm(vector)
                / np.linalg.norm(native.vectors[block])
            )
            # Read as the target's own answers: 0.8-0.9 (read as bare text 0.65-0.76; a map fitted
            # on neutral texts about 0.1).
            assert cosine > 0.75, (block, cosine)
        calibration = carried.calibration
        assert calibration.strength == pirate.default_strength  # the persona keeps the source's default
        assert calibration.scale in [step.scale for step in calibration.steps]
        chosen = next(step for step in calibration.steps if step.scale == calibration.scale)
        assert chosen.perplexity_ratio <= calibration.fluency_bar or chosen is calibration.steps[0]
        assert calibration.fluency_bar > 1.6  # pirate reads as unlikely to the unsteered source too
        again = await carry_by_generation(
            qwen, llama, pirate.vectors, pirate.default_strength, pirate.default_positions, spec
        )
        # Seeded: reproducible, the default strength too.
        assert all(np.allclose(again.vectors[b], carried.vectors[b], atol=1e-5) for b in carried.vectors)
        assert again.calibration.scale == carried.calibration.scale  # (batching moves the last digits)
        assert [s.effect for s in again.calibration.steps] == pytest.approx(
            [s.effect for s in carried.calibration.steps], abs=1e-3
        )
    finally:
        await llama.close()
        await qwen.close()


def test_the_calibrated_scale_is_the_first_fluent_step_that_reaches_the_source() -> None:
    from server.transfer.strength_calibration import CalibrationStep, chosen_scale

    def ladder(*steps: tuple[float, float, float]) -> list[CalibrationStep]:
        return [CalibrationStep(*step) for step in steps]

    # Not reached yet, fluent: climb on (and at the end of the ladder take the strongest).
    assert chosen_scale(ladder((1, 0.5, 1.1)), last=False) is None
    assert chosen_scale(ladder((1, 0.5, 1.1), (2, 0.8, 1.3)), last=True) == 2
    # Reached while fluent.
    assert chosen_scale(ladder((1, 0.5, 1.1), (2, 1.2, 1.3)), last=False) == 2
    # Past the perplexity bar: the step before, even if this one reached the source's effect.
    assert chosen_scale(ladder((1, 0.5, 1.1), (2, 1.2, 3.0)), last=False) == 1
    # The weakest step already past the bar (or no answers at all): the weakest.
    assert chosen_scale(ladder((1, 0.2, 2.5)), last=False) == 1
    assert chosen_scale(ladder((1, 0.0, float("nan"))), last=False) == 1
    # A persona that costs the source perplexity itself gets that much room (and 10% more).
    assert chosen_scale(ladder((1, 0.5, 2.0), (2, 1.2, 2.5)), last=False, bar=3.0) == 2
    assert chosen_scale(ladder((1, 0.5, 2.0), (2, 1.2, 2.5)), last=False) == 1  # the fixed bar, 1.6


def test_the_fluency_bar_is_the_sources_own_cost_with_room_or_the_fixed_bar() -> None:
    from server.transfer.strength_calibration import FLUENT_PERPLEXITY_RATIO, fluency_bar

    assert fluency_bar(2.5) == pytest.approx(2.75)
    assert fluency_bar(1.2) == fluency_bar(None) == fluency_bar(float("nan")) == FLUENT_PERPLEXITY_RATIO


def test_the_ablation_table_and_plot_average_each_setting_over_the_cells() -> None:
    from server.evaluation.intervals import Interval
    from server.evaluation.plots import ablation_png
    from server.evaluation.transfer_ablation import AblationPoint, format_ablation_table

    def point(ablation: str, persona: str, setting: int, transfer: float) -> AblationPoint:
        return AblationPoint(
            ablation,
            "demo-llama",
            "demo-qwen",
            persona,
            setting,
            Interval(transfer, transfer - 0.1, transfer + 0.1),
        )

    points = [
        point("prompts", "pirate", 18, 0.2),
        point("prompts", "silly", 18, 0.6),
        point("prompts", "pirate", 140, 0.9),
        point("block", "formal", -1, 0.3),
        point("block", "formal", 0, 0.8),
    ]
    table = format_ablation_table(points)
    assert "| prompts | 18 | 0.40 | 2 |" in table and "| prompts | 140 | 0.90 | 1 |" in table
    assert "| block | -1 | 0.30 | 1 |" in table and "| block | +0 | 0.80 | 1 |" in table
    assert points[0].to_dict()["transfer_low"] == pytest.approx(0.1)
    assert ablation_png([p.to_dict() for p in points]).startswith(b"\x89PNG")


def test_the_transfer_table_compares_each_forecast_with_the_measured_transfer() -> None:
    from server.evaluation.intervals import Interval
    from server.evaluation.strength_sweep import StrengthRow
    from server.evaluation.transfer_table import TransferRow, format_transfer_table, transfer_record

    row = StrengthRow("pirate", 2.0, 0.5, 1.3, 0.9, 0.0, "arr")

    def cell(persona: str, condition: str, measured: float, predicted: float | None) -> TransferRow:
        interval = Interval(measured, measured - 0.1, measured + 0.1)
        return TransferRow(
            "demo-llama", "demo-qwen", persona, condition, row, row, interval, interval, predicted
        )

    rows = [
        cell("pirate", "generated", 0.9, 0.8),
        cell("formal", "generated", 0.5, 0.6),
        cell("silly", "generated", 0.1, 0.2),
        cell("pirate", "ridge", 0.0, None),
    ]
    table = format_transfer_table(rows)
    # Each cell's interval is +-0.1: the mean of 3 independent cells is +-0.1 / sqrt(3).
    assert "| generated | 0.50 [0.44, 0.56] | 0.50 [0.44, 0.56] | 3 |" in table
    assert "| ridge | 0.00 [-0.10, 0.10] | 0.00 [-0.10, 0.10] | 1 |" in table
    assert "against measured, 3 cells: Pearson r = 0.98, mean absolute error 0.10." in table
    assert transfer_record(rows[0])["predicted_transfer"] == 0.8
    assert transfer_record(rows[3])["predicted_transfer"] is None


@pytest.mark.slow  # demo models answer and are read back, in process: up to a minute
async def test_the_table_scores_the_generated_persona_at_the_stored_default() -> None:
    from server.demo.models import demo_model_dir, load_demo_personas
    from server.engine.registry import load_backend
    from server.evaluation.transfer_table import TransferRun, transfer_table
    from server.steering.mapping import MappingMethod

    models = ("demo-llama", "demo-qwen")
    backends = {name: load_backend(demo_model_dir(name), name) for name in models}
    try:
        run = TransferRun(
            samples=1,
            methods=(MappingMethod.GENERATED, MappingMethod.ZERO_PAD),
            multiples=(1.0,),
            personas=("silly",),
        )
        rows = await transfer_table(backends, run, models=models)
    finally:
        for backend in backends.values():
            await backend.close()
    assert sorted((r.source, r.condition) for r in rows) == sorted(
        (source, condition) for source in models for condition in ("none", "native", "generated", "zero_pad")
    )
    generated = [r for r in rows if r.condition == "generated"]
    zero_pad = [r for r in rows if r.condition == "zero_pad"]
    # Both are scored at the stored default, the source's strength; the generated persona forecasts
    # its transfer (its calibration), zero_pad does not.
    silly = {(p.model, p.name): p for m in models for p in load_demo_personas(m)}
    mapped = generated + zero_pad
    assert all(r.at_default.strength == silly[(r.source, "silly")].default_strength for r in mapped)
    assert all(r.predicted is not None for r in generated) and all(r.predicted is None for r in zero_pad)
    # Silly carries in both directions (about 1.0 of native in the table); zero-padding does not.
    assert np.mean([r.default_transfer.estimate for r in generated]) > 0.6
    assert (
        np.mean([r.default_transfer.estimate for r in generated])
        > np.mean([r.default_transfer.estimate for r in zero_pad]) + 0.3
    )


def test_the_mean_interval_leaves_out_cells_without_an_estimate() -> None:
    from server.evaluation.intervals import Interval, mean_interval

    nan = float("nan")
    mean = mean_interval([Interval(0.4, 0.2, 0.6), Interval(0.8, 0.6, 1.0), Interval(nan, nan, nan)])
    assert mean.estimate == pytest.approx(0.6)
    assert mean.high - mean.estimate == pytest.approx(0.2 / np.sqrt(2))  # two cells of +-0.2


@pytest.mark.slow  # demo models answer and are read back, in process: up to a minute
async def test_a_persona_carried_from_a_model_to_itself_comes_back_in_direction_and_scale() -> None:
    """The known truth: from a model to itself the map is the identity. The carried pirate must
    point where the persona points and need no rescaling."""
    from server.demo.corpus import training_questions
    from server.demo.models import demo_model_dir, load_demo_personas
    from server.engine.registry import load_backend
    from server.transfer.carry import GenerationSpec, carry_by_generation

    qwen = load_backend(demo_model_dir("demo-qwen"), "demo-qwen")
    try:
        pirate = {p.name: p for p in load_demo_personas("demo-qwen")}["pirate"]
        spec = GenerationSpec(prompts=tuple(q for _, q in training_questions()[::3]), seed=7)
        carried = await carry_by_generation(
            qwen, qwen, pirate.vectors, pirate.default_strength, pirate.default_positions, spec
        )
    finally:
        await qwen.close()
    assert sorted(carried.vectors) == sorted(pirate.vectors)
    for block, vector in carried.vectors.items():
        native = pirate.vectors[block]
        assert vector @ native / np.linalg.norm(vector) / np.linalg.norm(native) > 0.7, block  # 0.76-0.92
        # The norm calibration is exact on one model; what is left is the calibrated scale.
        assert np.linalg.norm(vector) / np.linalg.norm(native) == pytest.approx(
            carried.calibration.scale, rel=1e-3
        )
    assert 0.7 <= carried.calibration.scale <= 1.4  # 1.0 when measured
