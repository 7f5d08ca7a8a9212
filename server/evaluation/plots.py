"""The evaluation's figures: the transfer table's trait against coherence, and the transfer ablations."""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np

from server.plotting import drawn_alone, png_bytes

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt


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
    return png_bytes(figure)


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
    return png_bytes(figure)
