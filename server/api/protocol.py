"""Request bodies of the HTTP API: the OpenAI fields that matter plus persona-server's own.

Unknown OpenAI fields are accepted and ignored, as vLLM does, so that ordinary clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from persona_store.mappings import MAPPING_ID_PATTERN
from persona_store.records import PERSONA_NAME_PATTERN
from server.api.json_types import (
    JSON_SAFE_INTEGER,
    LAYER_KEYS,
    Bool,
    Float,
    Int,
    LayerIndex,
    LayerKey,
    Seed,
    TokenId,
)
from server.serving.requests import MAX_LOGPROBS
from server.steering.closed_loop import DEFAULT_GAIN
from server.steering.mapping import MappingMethod
from server.steering.plan import Positions


def _valid_unicode(value: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"); no tokenizer, database or encoder accepts one.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("the text holds a lone surrogate, which is not valid Unicode") from exc
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
PromptText = Annotated[str, StringConstraints(min_length=1), AfterValidator(_valid_unicode)]
PersonaName = Annotated[str, StringConstraints(pattern=PERSONA_NAME_PATTERN)]
# A served model's name as a bake gives it (also its folder under the data dir).
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
# Bounds of the lists a request may carry: each item costs work on every request (a store lookup per
# persona, a scan of the text per stop string), so a hostile body under the byte cap stays cheap.
MAX_COMPOSED_PERSONAS = 16
MAX_STOP_STRINGS = 64
StopText = Annotated[str, StringConstraints(max_length=1024), AfterValidator(_valid_unicode)]
StopList = Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        # One clear refusal of an image (or audio, file) part, instead of an error per union member.
        for index, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"part {index} has type '{kind}': this server reads text parts only")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class PersonaTermIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PersonaName
    strength: Float | None = None


class SteeringIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[LayerIndex] | None = Field(None, min_length=1, max_length=1024)
    positions: Positions | None = None


class PersonaTargetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PersonaName
    score: Float = Field(description="The trait score (projection) the answer should hold.")
    strength: Float | None = Field(
        None,
        description="The prompt's strength (default: the persona's default); generated tokens start "
        "there too when the persona's positions steer them, else at 0.",
    )
    max_strength: Float | None = Field(
        None,
        gt=0,
        description="The controller keeps |strength| within this (default: the persona's default strength).",
    )
    gain: Float = Field(
        DEFAULT_GAIN,
        gt=0,
        le=100,
        description="How fast the strength follows the error (strength per unit of error, in units of "
        "the vector's norm).",
    )


class SteerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PersonaName
    strength: Float | None = Field(None, description="Default: the persona's default strength.")


class PersonaRuleIn(BaseModel):
    """When a monitored persona's projection crosses a threshold, steer with another from the next
    token on."""

    model_config = ConfigDict(extra="forbid")

    monitor: PersonaName
    above: Float | None = Field(None, description="Fire when the projection is above this.")
    below: Float | None = Field(None, description="Fire when the projection is below this.")
    steer: SteerIn
    for_tokens: Int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Steer at most this many tokens in a row (default: until the projection drops back).",
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> PersonaRuleIn:
        if (self.above is None) == (self.below is None):
            raise ValueError("a persona_when rule takes exactly one of above or below")
        return self


class StreamOptions(BaseModel):
    include_usage: Bool = False


class JsonSchemaFormat(BaseModel):
    name: str = Field("answer", max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(BaseModel):
    """``text`` (the default), any JSON object, or JSON that follows a schema (engines that can
    constrain decoding: vLLM)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


ComposedPersonas = Annotated[list[PersonaTermIn], Field(max_length=MAX_COMPOSED_PERSONAS)]


class _CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    stop: StopText | StopList | None = Field(
        None, description=f"A string, or up to {MAX_STOP_STRINGS}, that end the answer."
    )
    seed: Seed | None = Field(
        None, description="The same seed gives the same answer on the same engine; answer i uses seed + i."
    )
    n: Int = Field(1, ge=1, le=128, description="Answers to the prompt (they share its prefill).")
    best_of: Int | None = Field(None, ge=1, le=128, description="Only best_of = n (or none) is served.")
    top_k: Int | None = Field(None, ge=-1, description="Sample among the k likeliest tokens (0 or -1: all).")
    min_p: Float | None = Field(
        None, ge=0, le=1, description="Drop tokens below min_p times the likeliest token's probability."
    )
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    repetition_penalty: Float | None = Field(
        None, gt=0, le=100, description="vLLM's: > 1 discourages tokens of the prompt and the answer."
    )
    min_tokens: Int | None = Field(None, ge=0, description="No end of the answer before this many tokens.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = None
    return_tokens_as_token_ids: Bool = Field(
        False, description="Name the tokens of logprobs token_id:N (as vLLM does), which no two tokens share."
    )
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    persona: PersonaName | ComposedPersonas | None = Field(
        None,
        description=f"A persona name, or a list of up to {MAX_COMPOSED_PERSONAS} {{name, strength}} to "
        "compose (their strengths' absolute values add up to at most --max-strength at each block).",
    )
    persona_strength: Float | None = Field(
        None, description="Multiplies the persona's vector (default: the persona's default strength)."
    )
    steering: SteeringIn | None = None
    ignore_eos: Bool = Field(False, description="Keep generating past end-of-sequence (as in vLLM).")
    persona_monitor: list[PersonaName] | None = Field(
        None, max_length=16, description="Personas whose trait score the answer reports (persona_scores)."
    )
    persona_monitor_tokens: Bool = Field(
        False,
        description="With persona_monitor: each token's projection as the model wrote it "
        "(persona_token_scores), read in the pass that chose the token.",
    )
    persona_target: PersonaTargetIn | None = Field(
        None, description="Steer with a persona at a strength set token by token to hold a trait score."
    )
    persona_when: list[PersonaRuleIn] | None = Field(
        None, min_length=1, max_length=8, description="Steer only while a monitored trait shows."
    )

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stop for stop in stops if stop)


class ChatCompletionRequest(_CompletionRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = Field(False, description="Return each answer token's log-probability.")
    top_logprobs: Int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many likeliest alternatives per token."
    )


class CompletionRequest(_CompletionRequest):
    # An empty prompt gives the model nothing to continue (most tokenizers encode it to no token).
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1)] = Field(
        description="A prompt, or a list of prompts (n answers each, numbered prompt by prompt)."
    )
    logprobs: Int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each token's log-probability and its k likeliest rivals."
    )
    echo: Bool = Field(False, description="Each answer begins with its prompt.")


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
        MappingMethod.GENERATED,
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
