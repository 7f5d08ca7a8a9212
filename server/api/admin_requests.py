"""Request bodies of the admin API: personas, mappings, extraction and bake jobs.

The OpenAI request bodies (chat and text completions) are in ``server.serving.protocol.requests``;
their scalar types, which these share, in ``server.serving.protocol.json_types``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from persona_store.mappings import MAPPING_ID_PATTERN
from server.serving.protocol.json_types import (
    JSON_SAFE_INTEGER,
    LAYER_KEYS,
    Bool,
    Float,
    Int,
    LayerIndex,
    LayerKey,
    PersonaName,
    Seed,
    Text,
)
from server.steering.mapping import DEFAULT_METHOD, MappingMethod
from server.steering.plan import Positions

# A served model's name as a bake gives it (also its folder under the data dir).
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class PersonaUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text
    layers: dict[LayerKey, list[Float]] = Field(
        min_length=1,
        description="Decoder block index -> vector of the model's hidden size.",
        json_schema_extra=LAYER_KEYS,
    )
    default_strength: Float = 1.0
    default_positions: Positions = Field(Positions.ALL, description="Where the persona steers by default.")
    description: Text = Field("", max_length=4000)


class PersonaRestore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text
    version: Int = Field(ge=1, le=JSON_SAFE_INTEGER, description="The kept version to make current again.")


class MappingFitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: Text
    target_model: Text
    layers: dict[LayerKey, LayerIndex] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Source block -> target block (default: by relative depth).",
        json_schema_extra=LAYER_KEYS,
    )
    texts: list[Annotated[Text, StringConstraints(min_length=1, max_length=4000)]] | None = Field(
        None, max_length=20_000, description="Neutral texts both models read (default: a bundled corpus)."
    )
    lambdas: list[Annotated[Float, Field(gt=0)]] | None = Field(
        None,
        min_length=1,
        max_length=50,
        description="Ridge penalties, relative to the mean Gram eigenvalue.",
    )
    folds: Int | None = Field(None, ge=2, le=20)
    reduce: Literal["mean", "last"] = Field(
        "mean", description="Each text's block output: its mean over tokens, or its last token."
    )


# Checked by the mapping service (400 naming mapping_id, as for the id in a path); stated here.
MappingId = Annotated[
    str, Field(max_length=64), WithJsonSchema({"type": "string", "pattern": MAPPING_ID_PATTERN})
]


class PersonaMapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: Text
    target_model: Text
    mapping_id: MappingId | None = Field(None, description="Default: the newest fitting mapping.")
    method: MappingMethod = Field(
        DEFAULT_METHOD,
        description="generated (the default: the source writes with and without the persona, the "
        "target reads both; no fitted map needed), or a map: ridge, procrustes, concept, zero_pad, "
        "interpolate, random.",
    )
    target_name: PersonaName | None = Field(
        None, description="The name to store it under on the target model (default: the persona's name)."
    )
    replace: Bool = Field(
        False,
        description="Replace a persona of that name on the target even when it was not mapped from this "
        "persona on this source model (without it, such a persona is a 409 persona_exists).",
    )


class ExtractionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text
    positive_prompts: list[Annotated[Text, StringConstraints(max_length=4000)]] = Field(
        min_length=1, max_length=256
    )
    negative_prompts: list[Annotated[Text, StringConstraints(max_length=4000)]] = Field(
        min_length=1, max_length=256
    )
    questions: list[Annotated[Text, StringConstraints(min_length=1, max_length=4000)]] = Field(
        min_length=1,
        max_length=5000,
        description="Each is answered samples_per_question times with each persona prompt set: at most "
        "20,000 answers in all (400 above).",
    )
    layers: list[LayerIndex] | None = Field(
        None, min_length=1, max_length=256, description="Blocks to store (null: the recommended)."
    )
    samples_per_question: Int = Field(1, ge=1, le=64)
    default_strength: Float | None = Field(None, description="Stored default strength (null: 1.0).")
    max_tokens: Int = Field(48, ge=1, le=1024, description="Length of each generated answer.")
    temperature: Float = Field(1.0, ge=0, le=2)
    seed: Seed = 0
    description: Text = Field("", max_length=4000)


# A bake's bounds: what a user baking a persona needs, with room (defaults 32 / 200 / 300 / 48), and
# no more, since one bake holds a model's job place and a copy of its weights in training for its
# whole run (the old ceilings, 5000 answers of 1024 tokens and 20,000 steps, made a bake of hours that
# slowed every chat on the server). Retention on the demo models is reached by 200 answers and 300
# steps; ranks past 128 are full-rank in all but name for the models served here.
MAX_BAKE_RANK = 128
MAX_BAKE_TRAJECTORIES = 2000
MAX_BAKE_STEPS = 3000
MAX_BAKE_TOKENS = 256  # a persona shows in an answer's first sentences
MAX_BAKE_PROMPTS = 2500  # 4 in 5 teach: 2000 answers never need more distinct prompts


class BakeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text = Field(description="The served model to bake the persona into (its HF weights).")
    strength: Float | None = Field(None, description="Default: the persona's default strength.")
    rank: Int = Field(32, ge=1, le=MAX_BAKE_RANK, description="LoRA rank.")
    trajectories: Int = Field(
        200, ge=4, le=MAX_BAKE_TRAJECTORIES, description="Answers of the steered model to learn from."
    )
    steps: Int = Field(300, ge=1, le=MAX_BAKE_STEPS, description="Training steps (batches of 8 answers).")
    max_tokens: Int = Field(48, ge=1, le=MAX_BAKE_TOKENS, description="Length of each sampled answer.")
    prompts: list[Annotated[Text, StringConstraints(min_length=1, max_length=4000)]] | None = Field(
        None,
        min_length=2,
        max_length=MAX_BAKE_PROMPTS,
        description="Prompts to answer (default: the fitting corpus).",
    )
    served_name: Annotated[str, StringConstraints(pattern=SERVED_NAME_PATTERN)] | None = Field(
        None, description="The baked model's name (default: MODEL+PERSONA)."
    )
    seed: Int = Field(0, ge=0, le=2**31 - 1, description="Sampling and training seed.")
