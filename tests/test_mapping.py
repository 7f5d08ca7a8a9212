"""The linear maps that carry personas between models: ridge with CV, its rivals, calibration."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from server.steering.mapping import (
    MappingError,
    calibrate,
    concept_adapter,
    corresponding_layer,
    effective_rank,
    fit_ridge,
    interpolate,
    plain_ridge,
    procrustes,
    random_orthogonal,
    zero_pad_or_truncate,
)


def linear_pairs(
    n: int, p: int, q: int, noise: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true_map = rng.standard_normal((p, q)) / np.sqrt(p)
    x = rng.standard_normal((n, p)) * np.linspace(0.2, 3.0, p) + 5.0  # uneven scales, an offset
    y = x @ true_map + noise * rng.standard_normal((n, q)) - 2.0
    return x, y, true_map


def test_ridge_recovers_a_known_linear_relation() -> None:
    x, y, true_map = linear_pairs(n=400, p=24, q=40, noise=0.01)
    fit = fit_ridge(x, y, folds=5, lambdas=(1e-6, 1e-4, 1e-2, 1.0))
    assert np.abs(fit.weights - true_map).max() < 0.02
    assert fit.r2 > 0.999
    assert fit.chosen_lambda == min(fit.lambdas)  # almost no noise: the least shrinkage wins


def test_cross_validation_equals_refitting_without_each_fold() -> None:
    x, y, _ = linear_pairs(n=60, p=10, q=6, noise=0.5, seed=1)
    fit = fit_ridge(x, y, folds=4, seed=3, sketch=10_000)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    rng = np.random.default_rng(3)
    parts = [np.sort(part) for part in np.array_split(rng.permutation(60), 4)]
    for value, reported in zip(fit.lambdas, fit.cv_errors, strict=True):
        squared = 0.0
        for rows in parts:
            train = np.setdiff1d(np.arange(60), rows)
            w = np.linalg.solve(xc[train].T @ xc[train] + value * np.eye(10), xc[train].T @ yc[train])
            squared += ((yc[rows] - xc[rows] @ w) ** 2).sum()
        assert reported == pytest.approx(squared / (60 * 6), rel=1e-9)


def test_cross_validation_prefers_more_shrinkage_when_pairs_are_few_and_noisy() -> None:
    x, y, _ = linear_pairs(n=30, p=24, q=8, noise=3.0, seed=2)
    noisy = fit_ridge(x, y, folds=5)
    x, y, _ = linear_pairs(n=3000, p=24, q=8, noise=0.01, seed=2)
    clean = fit_ridge(x, y, folds=5)
    relative = lambda fit: fit.lambdas.index(fit.chosen_lambda)  # noqa: E731
    assert relative(noisy) > relative(clean)
    assert noisy.r2 < clean.r2


def test_the_sketched_cv_estimates_the_full_cv() -> None:
    x, y, _ = linear_pairs(n=200, p=16, q=600, noise=1.0, seed=4)
    exact = fit_ridge(x, y, folds=5, sketch=10_000)
    sketched = fit_ridge(x, y, folds=5, sketch=256)
    assert np.allclose(sketched.cv_errors, exact.cv_errors, rtol=0.15)
    assert np.array_equal(sketched.weights, exact.weights)  # the final map uses every column


def test_plain_ridge_is_the_same_map() -> None:
    x, y, _ = linear_pairs(n=100, p=12, q=9, noise=0.3, seed=5)
    fit = fit_ridge(x, y)
    assert np.allclose(plain_ridge(x, y, fit.chosen_lambda), fit.weights, atol=1e-5)


def test_bad_inputs_are_refused() -> None:
    x, y, _ = linear_pairs(n=8, p=4, q=3, noise=0.1)
    with pytest.raises(MappingError, match="too few"):
        fit_ridge(x, y, folds=5)
    with pytest.raises(MappingError, match="paired"):
        fit_ridge(x, y[:5])
    with pytest.raises(MappingError, match="positive"):
        fit_ridge(x, y, folds=2, lambdas=[1.0, -1.0])


def test_procrustes_finds_a_rotation_and_is_semi_orthogonal_across_widths() -> None:
    rng = np.random.default_rng(6)
    rotation, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    x = rng.standard_normal((300, 16))
    assert np.allclose(procrustes(x, x @ rotation), rotation, atol=1e-5)
    narrow = procrustes(rng.standard_normal((300, 16)), rng.standard_normal((300, 10)))
    assert narrow.shape == (16, 10) and np.allclose(narrow.T @ narrow, np.eye(10), atol=1e-5)


def test_the_concept_adapter_maps_its_concepts_and_generalises_in_their_span() -> None:
    rng = np.random.default_rng(7)
    true_map = rng.standard_normal((20, 30))
    concepts = rng.standard_normal((4, 20))
    w = concept_adapter(concepts, concepts @ true_map, ridge=1e-8)
    assert np.allclose(concepts @ w, concepts @ true_map, atol=1e-3)
    mix = 0.3 * concepts[0] - 1.2 * concepts[2]
    assert np.allclose(mix @ w, mix @ true_map, atol=1e-3)


def test_naive_baselines() -> None:
    vector = np.arange(1.0, 6.0, dtype=np.float32)
    assert zero_pad_or_truncate(vector, 7).tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert zero_pad_or_truncate(vector, 3).tolist() == [1, 2, 3]
    assert interpolate(vector, 9).tolist() == pytest.approx([1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5])
    for p, q in ((12, 20), (20, 12)):
        w = random_orthogonal(p, q, seed=1)
        assert w.shape == (p, q)
        small = min(p, q)
        gram = w.T @ w if p >= q else w @ w.T
        assert np.allclose(gram, np.eye(small), atol=1e-5)
    assert not np.allclose(random_orthogonal(8, 8, seed=1), random_orthogonal(8, 8, seed=2))


def test_layers_correspond_by_relative_depth() -> None:
    assert [corresponding_layer(layer, 4, 8) for layer in range(4)] == [0, 2, 5, 7]
    assert [corresponding_layer(layer, 28, 32) for layer in (0, 14, 27)] == [0, 16, 31]


def test_calibration_keeps_the_relative_norm() -> None:
    source = np.full(4, 2.0, dtype=np.float32)  # norm 4 on a model whose residuals have norm 40
    mapped = np.ones(6, dtype=np.float32) * 7.0
    calibrated = calibrate(mapped, source, source_norm=40.0, target_norm=300.0)
    assert np.linalg.norm(calibrated) == pytest.approx(30.0)  # 10% of the target's residual norm
    assert np.allclose(calibrated / np.linalg.norm(calibrated), mapped / np.linalg.norm(mapped))


def test_effective_rank() -> None:
    assert effective_rank(np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert effective_rank(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert torch.is_tensor(torch.as_tensor(0))  # torch is importable beside numpy here


def test_demo_personas_map_to_the_other_width_by_every_method_with_calibrated_norms() -> None:
    from server.demo.models import load_demo_personas
    from server.steering.mapping import MappingMethod
    from server.transfer.maps import ModelShape, fit_maps, map_persona_vectors

    llama = {p.name: p for p in load_demo_personas("demo-llama")}
    qwen = {p.name: p for p in load_demo_personas("demo-qwen")}
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((50, 2, 4, 128)), 3.0 * rng.standard_normal((50, 2, 4, 96))
    maps = fit_maps(xs, ys, {b: b for b in range(4)}, folds=2)
    others = [(llama[o], qwen[o]) for o in ("formal", "silly")]
    source, target = ModelShape(4, 128, (0, 1, 2, 3)), ModelShape(4, 96, (0, 1, 2, 3))
    for method in set(MappingMethod) - {MappingMethod.GENERATED}:  # that one needs served models
        concepts = [(a.vectors, b.vectors) for a, b in others]
        fitted = maps.for_method(method)  # as the transfer table and the server's map request take it
        mapped = map_persona_vectors(method, llama["pirate"].vectors, source, target, fitted, concepts)
        # The concept adapter maps the blocks where another persona has a vector too (formal: 0,
        # silly: 1); every other method maps all of pirate's blocks.
        expected = [0, 1] if method is MappingMethod.CONCEPT else sorted(llama["pirate"].vectors)
        assert sorted(mapped) == expected
        for block, vector in mapped.items():
            assert vector.shape == (96,) and vector.dtype == np.float32
            source_vector = llama["pirate"].vectors[block]
            relative = np.linalg.norm(source_vector) / np.linalg.norm(xs[:, 0, block], axis=1).mean()
            target_norm = np.linalg.norm(ys[:, 0, block], axis=1).mean()
            assert np.linalg.norm(vector) == pytest.approx(relative * target_norm, rel=1e-4)


def test_a_learned_method_without_its_map_and_an_unmappable_persona_are_refused() -> None:
    from server.steering.errors import SteeringError
    from server.steering.mapping import MappingError, MappingMethod
    from server.transfer.maps import ModelShape, map_persona_vectors

    shape = ModelShape(4, 8, (1, 2, 3))  # a GGUF-like target: block 0 cannot be steered
    vectors = {0: np.ones(8, np.float32)}
    with pytest.raises(MappingError, match="fitted ridge map"):
        map_persona_vectors(MappingMethod.RIDGE, vectors, shape, shape)
    with pytest.raises(SteeringError, match="can steer"):
        map_persona_vectors(MappingMethod.ZERO_PAD, vectors, shape, shape)
    with pytest.raises(SteeringError, match="concept adapter"):
        elsewhere = [({2: vectors[0]}, {2: vectors[0]})]  # another persona, but only at block 2
        map_persona_vectors(MappingMethod.CONCEPT, vectors, shape, shape, concepts=elsewhere)
    both = {0: np.ones(8, np.float32), 1: np.ones(8, np.float32)}
    assert sorted(map_persona_vectors(MappingMethod.INTERPOLATE, both, shape, shape)) == [1]


def test_the_shipped_fitting_corpus_is_the_demo_corpus_and_jsonl_reads(tmp_path: Path) -> None:
    from server.admin.fitting_corpus import DEMO_CORPUS, CorpusError, FittingCorpus
    from server.demo.corpus import neutral_texts

    shipped = FittingCorpus.load(DEMO_CORPUS)
    assert shipped.name == "demo-neutral.txt" and list(shipped.texts) == neutral_texts()
    lines = tmp_path / "texts.jsonl"
    lines.write_text('"first text"\n\n{"text": "second text"}\n')
    assert FittingCorpus.load(lines).texts == ("first text", "second text")
    lines.write_text('{"content": "no text field"}\n')
    with pytest.raises(CorpusError, match="text"):
        FittingCorpus.load(lines)
    with pytest.raises(CorpusError, match="cannot read"):
        FittingCorpus.load(tmp_path / "missing.txt")


def test_the_transfer_plot_is_a_png_with_a_row_per_three_panels() -> None:
    from matplotlib.image import imread

    from server.evaluation.plots import transfer_png

    def points(persona: str) -> list[dict[str, object]]:
        return [
            {
                "source": "a",
                "target": "b",
                "persona": persona,
                "condition": c,
                "perplexity": 1.5 + i,
                "trait_score": 0.1 * i,
            }
            for i, c in enumerate(("none", "native", "ridge"))
        ]

    one_row = imread(io.BytesIO(transfer_png(points("p"), "t")), format="png")
    two_rows = imread(io.BytesIO(transfer_png([p for n in "pqrs" for p in points(n)], "t")), format="png")
    # 4 x 3.4 inches a panel, three to a row, at 100 dpi; RGBA
    assert (one_row.shape, two_rows.shape) == ((340, 1200, 4), (680, 1200, 4))
    assert one_row[..., :3].std() > 0  # something is drawn
