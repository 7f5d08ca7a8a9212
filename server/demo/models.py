"""The demo models shipped in the package, their extracted personas, and seeding them into a store."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from persona_store.base import PersonaStore
from persona_store.errors import PersonaNotFound
from persona_store.records import PersonaDraft

DEMO_MODELS_DIR = Path(__file__).resolve().parent.parent / "demo_models"
DEMO_MODEL_NAMES = ("demo-llama", "demo-qwen", "demo-phi3")  # served and seeded in demo mode
# Shipped and built alike, not served in demo mode: the GPT-OSS-shaped target of the seed scenario
# (docs/seed-scenario.md), a mixture of experts that would slow every demo start.
SCENARIO_MODEL_NAMES = ("demo-gpt-oss",)
PERSONAS_FILE = "personas.json"
SEEDED_MARKER = "demo-personas-seeded.json"

logger = logging.getLogger(__name__)


def demo_model_dir(name: str) -> Path:
    return DEMO_MODELS_DIR / name


def load_demo_personas(name: str) -> list[PersonaDraft]:
    """The personas extracted for demo model ``name`` (as written by `python -m server.demo.build`)."""
    path = demo_model_dir(name) / PERSONAS_FILE
    entries: dict[str, Any] = json.loads(path.read_text())
    return [
        PersonaDraft(
            model=name,
            name=persona,
            vectors={
                int(layer): np.asarray(values, dtype=np.float32) for layer, values in entry["layers"].items()
            },
            default_strength=float(entry["default_strength"]),
            description=entry["description"],
            default_positions=entry.get("default_positions", "all"),
            provenance={"kind": "extracted", "source": "demo", **entry.get("provenance", {})},
        )
        for persona, entry in entries.items()
    ]


async def seed_demo_personas(store: PersonaStore, data_dir: Path) -> list[str]:
    """Put each demo persona in the store once. An operator's later edit or delete is kept: a persona
    seeded before (recorded in the data dir) is never written again."""
    marker = data_dir / SEEDED_MARKER
    seeded: list[str] = json.loads(marker.read_text()) if marker.exists() else []
    written = []
    for model in DEMO_MODEL_NAMES:
        for draft in load_demo_personas(model):
            key = f"{model}/{draft.name}"
            if key in seeded:
                continue
            try:
                await store.get(model, draft.name)
            except PersonaNotFound:
                await store.put(draft)
                written.append(key)
            seeded.append(key)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(sorted(seeded), indent=1))
    if written:
        logger.info("seeded demo personas: %s", ", ".join(written))
    return written
