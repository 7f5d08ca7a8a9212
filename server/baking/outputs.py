"""What a bake leaves on disk: the peft adapter, the merged model, its GGUF, the loss curve.

Each folder holds ``persona_bake.json``: the base model, the persona, its version, the strength,
the rank, the steps and the measured losses, so a baked model says what it is wherever it goes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from peft import PeftModel

from server.plotting import drawn_alone

PROVENANCE_FILE = "persona_bake.json"


def write_provenance(folder: Path, provenance: dict[str, Any]) -> None:
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """A baked model's provenance, or None for a model that was not baked here."""
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_adapter(model: PeftModel, folder: Path, provenance: dict[str, Any]) -> Path:
    """adapter_model.safetensors and adapter_config.json (peft's layout, which vLLM loads too)."""
    model.save_pretrained(str(folder), safe_serialization=True)
    write_provenance(folder, provenance)
    return folder


def save_merged(model: PeftModel, tokenizer: Any, folder: Path, provenance: dict[str, Any]) -> Path:
    """The base weights with the adapter added in: a plain checkpoint any transformers loads.
    Merging unloads the adapter from ``model``: save the adapter first."""
    merged = model.merge_and_unload()
    merged.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    write_provenance(folder, provenance)
    return folder


@drawn_alone  # pyplot is not thread-safe, and bakes run at once
def loss_curve_png(losses: list[float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.4), dpi=110)
    axes.plot(range(1, len(losses) + 1), losses, color="#2d5bd7")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("KL(teacher || student), nats/token")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
