"""Ridge-map fitting at real sizes: the whole cross-validation against plain solves, in one run.

Synthetic paired activations (N=5000 texts, a 3584-wide source such as a 7B Qwen, a 4096-wide
target such as an 8B Llama, a known linear relation plus noise), 5 lambdas x 5 folds:

- ``fit_ridge``: one float64 eigendecomposition of the Gram matrix, CV through the hat-matrix fold
  identity on a 512-column sketch of the target, the final map in the eigenbasis;
- one plain solve: center, Gram, X^T Y, Cholesky, solve (one lambda, all data);
- plain CV: for each fold its own Gram and X^T Y, and a Cholesky solve per lambda (25 solves).

    python -m loadtests.ridge_bench [--n 5000] [--source 3584] [--target 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from server.steering.mapping import DEFAULT_LAMBDAS, fit_ridge, plain_ridge


def plain_cv(x: np.ndarray, y: np.ndarray, relative: tuple[float, ...], folds: int) -> list[float]:
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    xt, yt = xt - xt.mean(dim=0), yt - yt.mean(dim=0)
    parts = np.array_split(np.random.default_rng(0).permutation(x.shape[0]), folds)
    scale = float(torch.linalg.matrix_norm(xt) ** 2) / x.shape[1]  # mean eigenvalue of the Gram
    errors = [0.0] * len(relative)
    for rows in parts:
        train = torch.as_tensor(np.setdiff1d(np.arange(x.shape[0]), rows))
        held = torch.as_tensor(rows)
        gram, cross = xt[train].T @ xt[train], xt[train].T @ yt[train]
        for index, value in enumerate(relative):
            factor = torch.linalg.cholesky(gram + value * scale * torch.eye(x.shape[1], dtype=torch.float64))
            weights = torch.cholesky_solve(cross, factor)
            errors[index] += float(((yt[held] - xt[held] @ weights) ** 2).sum())
    return errors


def timed(label: str, work: object) -> float:
    start = time.perf_counter()
    work()  # type: ignore[operator]
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def main(n: int, source: int, target: int) -> None:
    rng = np.random.default_rng(0)
    true_map = rng.standard_normal((source, target)).astype(np.float32) / np.sqrt(source)
    x = rng.standard_normal((n, source)).astype(np.float32)
    y = x @ true_map + 0.5 * rng.standard_normal((n, target)).astype(np.float32)
    print(
        f"N={n}, {source} -> {target}, {len(DEFAULT_LAMBDAS)} lambdas x 5 folds, "
        f"{torch.get_num_threads()} threads, float64"
    )
    fits: list[object] = []
    ours = timed("fit_ridge (whole CV + final map)", lambda: fits.append(fit_ridge(x, y, folds=5)))
    fit = fits[0]
    one = timed("one plain solve", lambda: plain_ridge(x, y, fit.chosen_lambda))  # type: ignore[attr-defined]
    naive = timed("plain CV (25 solves)", lambda: plain_cv(x, y, DEFAULT_LAMBDAS, 5))
    print("\n| fit | seconds | / one plain solve |\n|---|---|---|")
    for label, seconds in (
        ("fit_ridge, whole CV and final map", ours),
        ("one plain solve", one),
        ("plain CV, 25 solves", naive),
    ):
        print(f"| {label} | {seconds:.1f} | {seconds / one:.2f} |")
    print(
        f"\nchosen lambda {fit.chosen_lambda:.4g}, held-out R^2 {fit.r2:.4f}, "  # type: ignore[attr-defined]
        f"target: whole CV < 2x one plain solve: {'met' if ours < 2 * one else 'missed'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--source", type=int, default=3584)
    parser.add_argument("--target", type=int, default=4096)
    args = parser.parse_args()
    main(args.n, args.source, args.target)
