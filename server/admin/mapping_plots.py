"""A mapping's diagnostics drawn as a PNG (held-out error per lambda and the map's singular values),
and a mapped persona's strength calibration."""

from __future__ import annotations

from typing import Any

import matplotlib

from server.plotting import drawn_alone, png_bytes

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt

from server.transfer.strength_calibration import FLUENT_PERPLEXITY_RATIO


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
    return png_bytes(figure)


@drawn_alone
def calibration_png(calibration: dict[str, Any], title: str) -> bytes:
    """A carried persona's ladder of vector scales: the effect (share of the source's shift its
    answers reach) and the perplexity ratio per scale, the fluency bar and the chosen scale."""
    # Personas mapped before the bar followed the source's own perplexity cost stored none.
    bar = float(calibration.get("fluency_bar", FLUENT_PERPLEXITY_RATIO))
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
    return png_bytes(figure)
