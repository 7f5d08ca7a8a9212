"""A mapping's diagnostics drawn as a PNG: held-out error per lambda and the map's singular values."""

from __future__ import annotations

import io
from typing import Any

import matplotlib
import numpy as np

from server.plotting import drawn_alone

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt


def _png(figure: Any) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


@drawn_alone
def diagnostics_png(metadata: dict[str, Any], title: str) -> bytes:
    blocks: dict[str, dict[str, Any]] = metadata.get("blocks", {})
    figure, (errors, spectrum) = plt.subplots(1, 2, figsize=(10, 4))
    for block, diagnostics in sorted(blocks.items(), key=lambda item: int(item[0])):
        label = f"block {block} (R^2 {diagnostics['r2']:.2f})"
        errors.plot(diagnostics["lambdas"], diagnostics["cv_mse"], marker="o", label=label)
        errors.axvline(diagnostics["lambda"], linestyle=":", color=errors.lines[-1].get_color())
        spectrum.plot(diagnostics["singular_values"], label=f"block {block}")
    errors.set(xscale="log", xlabel="lambda", ylabel="held-out MSE (cross-validated)", title="ridge CV")
    spectrum.set(yscale="log", xlabel="index", ylabel="singular value", title="spectrum of W")
    for axes in (errors, spectrum):
        if axes.lines:
            axes.legend(fontsize="small")
    corpus = metadata.get("corpus")  # older fits did not record it
    fitted_on = f"fitted on {metadata.get('texts', '?')} texts" + (f" of {corpus}" if corpus else "")
    figure.suptitle(f"{title}\n{fitted_on}")
    return _png(figure)


@drawn_alone
def transfer_png(points: list[dict[str, Any]], title: str) -> bytes:
    """Trait score against coherence (perplexity under the unsteered target), one panel per
    source -> target and persona, one marker per condition."""
    panels = sorted({(p["source"], p["target"], p["persona"]) for p in points})
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    figure, grid = plt.subplots(rows, columns, figsize=(4 * columns, 3.4 * rows), squeeze=False)
    for axes, (source, target, persona) in zip(grid.flat, panels, strict=False):
        for point in points:
            if (point["source"], point["target"], point["persona"]) == (source, target, persona):
                axes.scatter(point["perplexity"], point["trait_score"], s=30)
                axes.annotate(point["condition"], (point["perplexity"], point["trait_score"]), fontsize=7)
        axes.set(
            title=f"{persona}: {source} -> {target}",
            xlabel="perplexity (unsteered target)",
            ylabel="trait score",
        )
    for axes in list(grid.flat)[len(panels) :]:
        axes.axis("off")
    figure.suptitle(title)
    return _png(figure)


@drawn_alone
def ablation_png(points: list[dict[str, Any]]) -> bytes:
    """Two panels: transfer against the number of prompts, and against the target block's offset;
    one line per persona and direction, with the mean over them in black."""
    figure, panels = plt.subplots(1, 2, figsize=(11, 4))
    labels = ("prompts the source answers", "target block - block of the same relative depth")
    for axes, ablation, label in zip(panels, ("prompts", "block"), labels, strict=True):
        chosen = [p for p in points if p["ablation"] == ablation]
        for key in sorted({(p["source"], p["target"], p["persona"]) for p in chosen}):
            line = sorted(
                (p["setting"], p["transfer"])
                for p in chosen
                if (p["source"], p["target"], p["persona"]) == key
            )
            axes.plot(*zip(*line, strict=True), marker="o", alpha=0.45, label=f"{key[2]}: {key[0]}->{key[1]}")
        settings = sorted({p["setting"] for p in chosen})
        means = [np.mean([p["transfer"] for p in chosen if p["setting"] == s]) for s in settings]
        axes.plot(settings, means, color="black", linewidth=2.5, marker="s", label="mean")
        axes.set(xlabel=label, ylabel="transfer at the calibrated default", ylim=(-0.3, 1.1))
        if ablation == "prompts":
            axes.set_xscale("log")
            axes.minorticks_off()  # only the counts tried are labelled
        axes.set_xticks(settings, [str(s) for s in settings])
        axes.legend(fontsize=6)
    figure.suptitle("generated method: transfer against prompts and block (demo models)")
    return _png(figure)


@drawn_alone
def calibration_png(calibration: dict[str, Any], bar: float, title: str) -> bytes:
    """A carried persona's ladder of vector scales: the effect (share of the source's shift its
    answers reach) and the perplexity ratio per scale, the fluency bar and the chosen scale."""
    steps = calibration["steps"]
    strengths = [step["scale"] for step in steps]
    figure, effect = plt.subplots(figsize=(6.5, 4))
    effect.plot(strengths, [step["effect"] for step in steps], marker="o", color="tab:blue", label="effect")
    effect.axhline(1.0, linestyle=":", color="tab:blue")
    effect.set(
        xscale="log",
        xlabel=f"scale of the vectors (at strength {calibration['strength']:g})",
        ylabel="effect (1 = the source's shift)",
    )
    fluency = effect.twinx()
    ratios = [step["perplexity_ratio"] for step in steps]
    fluency.plot(strengths, ratios, marker="s", color="tab:red", label="perplexity ratio")
    fluency.axhline(bar, linestyle=":", color="tab:red")
    fluency.set(ylabel="perplexity / unsteered perplexity")
    effect.axvline(calibration["scale"], color="black", linewidth=2, label="chosen scale")
    handles = effect.get_legend_handles_labels()[0] + fluency.get_legend_handles_labels()[0]
    effect.legend(handles=handles, fontsize="small", loc="upper left")
    predicted = calibration.get("predicted_transfer")
    figure.suptitle(title + ("" if predicted is None else f"\npredicted transfer {predicted:.2f}"))
    return _png(figure)
