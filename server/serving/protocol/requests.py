"""The OpenAI request bodies (chat and text completions): the OpenAI fields that matter plus
persona-server's own, and how a request turns itself into the engine's ``SamplingParams``
(``to_sampling_params``, as vLLM's requests do) and into the serving layer's ``CompletionJob``.

A sampling field is declared here and read in ``to_sampling_params``, and then it is the engine's
(``SamplingParams`` and what each engine does with it): nothing in between copies it.

Unknown OpenAI fields are accepted and ignored, as vLLM does, so that ordinary clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from server.engine.base import MAX_LOGPROBS, ChatMessage, SamplingParams, StructuredOutput
from server.serving.completion_job import (
    CompletionJob,
    PersonaTerm,
    SteeringOverride,
    TargetTerm,
    WhenRule,
)
from server.serving.errors import RequestRejected
from server.serving.persona_terms import persona_fields, persona_term
from server.serving.protocol.json_types import (
    VALID_UNICODE,
    Bool,
    Float,
    Int,
    LayerIndex,
    PersonaName,
    Seed,
    Text,
    TokenId,
)
from server.steering.closed_loop import DEFAULT_GAIN
from server.steering.operators import Operator
from server.steering.plan import Positions

PromptText = Annotated[str, StringConstraints(min_length=1), VALID_UNICODE]
# Bounds of the lists a request may carry: each item costs work on every request (a store lookup per
# persona, a scan of the text per stop string), so a hostile body under the byte cap stays cheap.
MAX_COMPOSED_PERSONAS = 16
MAX_STOP_STRINGS = 64
StopText = Annotated[str, StringConstraints(max_length=1024), VALID_UNICODE]
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
    operator: Operator | None = Field(
        None,
        description="add (the default): strength * vector; ablate: remove strength (default 1) times the "
        "projection on the persona's direction; cap: clamp that projection into [min, max].",
    )
    max: Float | None = Field(None, description="With operator cap: the highest projection let through.")
    min: Float | None = Field(None, description="With operator cap: the lowest projection let through.")

    def to_term(self) -> PersonaTerm:
        return persona_term(self.name, self.strength, self.operator, self.max, self.min)


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

    def to_term(self) -> TargetTerm:
        return TargetTerm(self.name, self.score, self.strength, self.max_strength, self.gain)


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

    def to_rule(self) -> WhenRule:
        threshold = self.above if self.above is not None else self.below
        assert threshold is not None  # the validator above holds exactly one
        steer = PersonaTerm(self.steer.name, self.steer.strength)
        return WhenRule(self.monitor, threshold, self.above is not None, steer, self.for_tokens)


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
    persona_operator: Operator | None = Field(
        None, description="How the persona is applied: add (the default), ablate or cap (see persona terms)."
    )
    persona_cap_max: Float | None = Field(None, description="With persona_operator cap: the upper bound.")
    persona_cap_min: Float | None = Field(None, description="With persona_operator cap: the lower bound.")
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

    def logprob_count(self) -> int | None:
        raise NotImplementedError  # chat and text completions ask for logprobs in their own words

    def structured_output(self) -> StructuredOutput | None:
        response_format = self.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return StructuredOutput()
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise RequestRejected(
                "response_format json_schema needs json_schema.schema", param="response_format"
            )
        return StructuredOutput(dict(response_format.json_schema.schema_))

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters (vLLM's ``to_sampling_params``): a field left out takes the
        engine's default, and a max_tokens left out the server's, within the context window."""
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            stop=self.stop_strings(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            min_tokens=self.min_tokens or 0,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprob_count(),
            structured=self.structured_output(),
            clamp_to_context=self.max_tokens is None,
        )

    def _persona_terms(self) -> tuple[str | list[PersonaTerm] | None, float | None]:
        listed = [term.to_term() for term in self.persona] if isinstance(self.persona, list) else None
        single = self.persona if isinstance(self.persona, str) else None
        operator = (self.persona_operator, self.persona_cap_max, self.persona_cap_min)
        return persona_fields(single, listed, self.persona_strength, *operator)

    def _job(self, **prompt: Any) -> CompletionJob:
        """The job this request asks for; ``prompt``: its messages, or its prompt (and echo)."""
        if self.best_of is not None and self.best_of != self.n:
            raise RequestRejected(
                "best_of other than n is not supported (vLLM dropped it too)", param="best_of"
            )
        self.structured_output()  # refuses a json_schema without its schema before the model is looked up
        persona, persona_strength = self._persona_terms()
        steering = None
        if self.steering is not None:
            layers = tuple(self.steering.layers) if self.steering.layers is not None else None
            steering = SteeringOverride(layers=layers, positions=self.steering.positions)
        target = self.persona_target
        return CompletionJob(
            model=self.model,
            sampling=self,
            n=self.n,
            tokens_as_ids=self.return_tokens_as_token_ids,
            stream=self.stream,
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            persona=persona,
            persona_strength=persona_strength,
            steering=steering,
            persona_monitor=tuple(self.persona_monitor or ()),
            monitor_tokens=self.persona_monitor_tokens,
            persona_target=None if target is None else target.to_term(),
            persona_when=tuple(rule.to_rule() for rule in self.persona_when or ()),
            **prompt,
        )


class ChatCompletionRequest(_CompletionRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = Field(False, description="Return each answer token's log-probability.")
    top_logprobs: Int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many likeliest alternatives per token."
    )

    @model_validator(mode="after")
    def _max_completion_tokens(self) -> ChatCompletionRequest:
        # OpenAI's newer name for max_tokens; max_tokens wins when both are given.
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_job(self) -> CompletionJob:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestRejected("top_logprobs needs logprobs: true", param="top_logprobs")
        return self._job(messages=[ChatMessage(message.role, message.text()) for message in self.messages])


class CompletionRequest(_CompletionRequest):
    # An empty prompt gives the model nothing to continue (most tokenizers encode it to no token).
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1)] = Field(
        description="A prompt, or a list of prompts (n answers each, numbered prompt by prompt)."
    )
    logprobs: Int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each token's log-probability and its k likeliest rivals."
    )
    echo: Bool = Field(False, description="Each answer begins with its prompt.")

    def logprob_count(self) -> int | None:
        return self.logprobs

    def to_job(self) -> CompletionJob:
        prompt = self.prompt  # a list is never empty: the field says so
        if isinstance(prompt, list):
            return self._job(prompt=prompt[0] if len(prompt) == 1 else tuple(prompt), echo=self.echo)
        return self._job(prompt=prompt, echo=self.echo)
