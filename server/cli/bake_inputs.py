"""What `persona-server bake` reads: the model's weights, the persona, the prompts."""

from __future__ import annotations

from pathlib import Path

import typer

from persona_store.errors import PersonaNotFound
from persona_store.records import PersonaRecord
from server.demo.models import DEMO_MODEL_NAMES, demo_model_dir, seed_demo_personas


def model_source(model: str) -> tuple[Path, str]:
    """(HF weights folder, model id): a demo model by name, or a local folder (id: its name)."""
    if model in DEMO_MODEL_NAMES:
        return demo_model_dir(model), model
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise typer.BadParameter(
            f"{model!r} is neither a demo model ({', '.join(DEMO_MODEL_NAMES)}) nor a local HF model folder",
            param_hint="--model",
        )
    return folder, folder.name


async def load_persona(store_url: str | None, model_id: str, name: str) -> PersonaRecord:
    """The persona from the store (the server's by default). A store that never held the demo
    personas gets them first, as `serve` would give them (one an operator deleted stays deleted)."""
    from server.app import open_store
    from server.settings import Settings

    settings = Settings()
    store = open_store(store_url or settings.store_url)
    try:
        if store_url is None and model_id in DEMO_MODEL_NAMES:
            await seed_demo_personas(store, settings.data_dir)
        return await store.get(model_id, name)
    except PersonaNotFound:
        raise typer.BadParameter(
            f"no persona {name!r} for model {model_id!r}", param_hint="--persona"
        ) from None
    finally:
        await store.close()


def prompts(prompts_file: Path | None) -> list[str]:
    if prompts_file is not None:
        return [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    from server.admin.fitting_corpus import DEMO_CORPUS, FittingCorpus

    return list(FittingCorpus.load(DEMO_CORPUS).texts)
